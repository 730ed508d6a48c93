"""The fusion registry: every fusion's name, summary and default, and the policy a model is built
with.

A fusion's state is decided, first match wins, by
  1. the command line (`--fusion NAME=0|1`, or `fusions={"name": False}` in the API),
  2. the environment (`KILN_<NAME>=0|1`, parsed strictly; a KILN_ name that is neither a
     fusion's toggle nor a setting of kiln/settings.py is an error),
  3. the measured default of this device (kernels/configs/fusions,device=<gpu>.json), then
  4. the builtin default below.
A fusion that cannot run where the model runs (CUDA graphs without the triton backend on CUDA,
programmatic dependent launch before Hopper) is off whatever was asked, with that reason as its
source. Fused ops that are off are replaced by their decomposition in the op set
(kiln/ops/decompose.py); `pdl` changes how the triton backend launches its kernels; the model
reads the policy only for the merged weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import ConfigError, UsageError
from kiln.kernels import CONFIG_DIR, config_name
from kiln.settings import SETTINGS


@dataclass(frozen=True)
class Fusion:
    name: str
    summary: str
    builtin: bool
    needs_gpu_backend: bool = False  # CUDA graphs: off unless the triton backend runs on CUDA
    min_capability: tuple[int, int] | None = None  # the oldest CUDA compute capability it runs on
    needs_triton: bool = False  # off unless the triton backend runs (on CUDA or interpreted)
    approximate: bool = False  # changes results beyond fp32 rounding: gated by KLD, not tokens
    tuned: bool = False  # its default on a GPU model is decided there by `kiln tune`

    @property
    def env_var(self) -> str:
        return "KILN_" + self.name.upper()


FUSIONS: dict[str, Fusion] = {}


def register(
    name: str,
    summary: str,
    builtin: bool = True,
    needs_gpu_backend: bool = False,
    min_capability: tuple[int, int] | None = None,
    needs_triton: bool = False,
    approximate: bool = False,
    tuned: bool = False,
) -> Fusion:
    FUSIONS[name] = Fusion(
        name, summary, builtin, needs_gpu_backend, min_capability, needs_triton, approximate, tuned
    )
    return FUSIONS[name]


# The builtin defaults are on: each fusion keeps the reference arithmetic up to fp32 summation
# order and is checked against its unfused form (tests/models/test_fusions.py). A device default
# (measured by `kiln ab`, stored with its numbers) overrides them.
register("merged_qkv", "Q, K, V weights concatenated at load: one mat-vec instead of three")
register("merged_gate_up", "gate and up weights concatenated at load: one mat-vec instead of two")
register("add_rms_norm", "residual add + RMSNorm(+weight) in one kernel")
register("qk_norm", "the Q and K per-head RMSNorms of the QKV result in one launch")
register(
    "qkv_norm_rope",
    "decode: QK RMSNorm, RoPE and the KV-cache write in one kernel (supersedes qk_norm)",
    tuned=True,
)
register("swiglu", "silu(gate) * up of the gate/up result in one kernel")
register(
    "moe_grouped",
    "MoE prompts: the tokens' experts sorted on the device and one grouped GEMM launch per "
    "weight (off: one launch per expert over the same sorting)",
)
register(
    "cuda_graphs",
    "the whole decode step captured once per batch size and replayed",
    needs_gpu_backend=True,
)
# Off until an A/B on a device turns it on there (its device default): the same kernels as the
# eager prompt forward, replayed (kiln/runtime/prompt_graphs.py).
register(
    "prompt_graphs",
    "a prompt's full micro-batches (ubatch tokens of one sequence) captured once and replayed",
    builtin=False,
    needs_gpu_backend=True,
    tuned=True,
)
# Off until an A/B on a device turns it on there (its device default), stored with the KLD gate:
# it rounds the activations of the decode mat-vecs to 8 bits (approximate, unlike the others).
register(
    "norm_quant",
    "decode: (add +) RMSNorm + quantize to q8_1 in one kernel, read by int8 (dp4a) mat-vecs "
    "(approximate: gated by KLD)",
    builtin=False,
    needs_triton=True,
    approximate=True,
    tuned=True,
)
# Off until an A/B on a device turns it on there (its device default): it changes only when
# kernels start, not what they compute.
register(
    "pdl",
    "programmatic dependent launch: each kernel starts while the one before drains, and waits "
    "on the device for its inputs",
    builtin=False,
    needs_gpu_backend=True,
    min_capability=(9, 0),
    tuned=True,
)


def device_defaults_path(device_name: str) -> Path:
    """Where the measured fusion defaults of a GPU model live."""
    return CONFIG_DIR / config_name("fusions", device_name)


def device_defaults(device: torch.device) -> dict[str, bool]:
    """{fusion: on} measured on this GPU model, {} where nothing was measured (or on a CPU).

    File format (written by `kiln tune --write`, kiln/bench/tune.py): {"fusion": {"on": bool,
    "evidence": "the A/B numbers and command", ...}, ..., "device": {the GPU it was measured
    on}}: keys that name no fusion are not states.
    """
    return {name: bool(entry["on"]) for name, entry in device_entries(device).items()}


def device_entries(device: torch.device) -> dict[str, dict]:
    """The measured entries of this GPU model's file, by fusion ({} on a CPU or unmeasured)."""
    if device.type != "cuda":
        return {}
    path = device_defaults_path(torch.cuda.get_device_name(device))
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {name: entry for name, entry in data.items() if name in FUSIONS}


def environment_names() -> list[str]:
    """Every KILN_ variable Kiln reads: the fusion toggles, then the settings (kiln/settings.py)."""
    return [f.env_var for f in FUSIONS.values()] + sorted(SETTINGS)


def check_environment(env: Mapping[str, str] | None = None) -> None:
    """A KILN_ variable that names no fusion and no setting is an error listing the valid
    names: a misspelt toggle (KILN_SWIGLUE=0) would otherwise change nothing, silently."""
    env = os.environ if env is None else env
    valid = environment_names()
    unknown = sorted(k for k in env if k.startswith("KILN_") and k not in valid)
    if unknown:
        raise ConfigError(
            f"unknown environment variable {', '.join(unknown)}: unset it or fix its name; "
            f"Kiln reads {', '.join(valid)} (see `kiln fusions` and the README)"
        )


def parse_env_value(var: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ConfigError(
            f"{var}={value!r} is not allowed: set it to 0 (off) or 1 (on), or unset it"
        )
    return value == "1"


def parse_sweep(items: Iterable[str] | None) -> list[dict[str, bool]]:
    """`kiln bench --fusion` values, each NAME=V[,V...] with V 0 or 1 (repeatable; "a=0,b=1"
    sets two): every combination of the listed values, in order -> [{name: on}, ...]."""
    values: dict[str, list[bool]] = {}
    for item in items or ():
        name = None
        for part in (p.strip() for p in item.split(",")):
            key, sep, value = part.rpartition("=")
            if sep:
                name = key.strip().replace("-", "_")
                check_name(name)
                values[name] = []
            if name is None or value.strip() not in ("0", "1"):
                raise UsageError(
                    f"--fusion {item!r}: write NAME=0, NAME=1 or NAME=0,1 (e.g. qk_norm=0)"
                )
            values[name].append(value.strip() == "1")
    combos: list[dict[str, bool]] = [{}]
    for name, states in values.items():
        combos = [{**c, name: s} for c in combos for s in dict.fromkeys(states)]
    return combos


def parse_overrides(items: Iterable[str] | None) -> dict[str, bool]:
    """`--fusion` values of a command that runs one configuration: NAME=0 or NAME=1
    (repeatable; "a=0,b=1" sets two) -> {name: on}."""
    combos = parse_sweep(items)
    if len(combos) > 1:
        raise UsageError("--fusion NAME=0,1 runs both: that is a sweep for kiln bench or kiln ab")
    return combos[0]


def check_name(name: str) -> None:
    if name not in FUSIONS:
        known = ", ".join(FUSIONS)
        raise UsageError(f"unknown fusion {name!r}; known: {known} (see `kiln fusions`)")


@dataclass(frozen=True)
class FusionPolicy:
    """Each fusion's state and where it came from (cli, env, device default, builtin, ...)."""

    states: Mapping[str, bool]
    sources: Mapping[str, str]

    def __getattr__(self, name: str) -> bool:
        try:
            return self.states[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def resolve(
        cls,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        overrides: Mapping[str, bool] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> FusionPolicy:
        device = torch.device(device)
        env = os.environ if env is None else env
        check_environment(env)
        overrides = dict(overrides or {})
        for name in overrides:
            check_name(name)
        measured = device_defaults(device)
        states, sources = {}, {}
        for name, f in FUSIONS.items():
            if name in overrides:
                state, source = overrides[name], "cli"
            elif f.env_var in env:
                state, source = parse_env_value(f.env_var, env[f.env_var]), "env"
            elif name in measured:
                state, source = measured[name], "device default"
            else:
                state, source = f.builtin, "builtin"
            if f.needs_gpu_backend and (device.type != "cuda" or backend != "triton"):
                state, source = False, f"n/a: needs the triton backend on CUDA (here {backend})"
            elif f.needs_triton and backend != "triton":
                state, source = False, f"n/a: needs the triton backend (here {backend})"
            elif f.min_capability and device.type == "cuda":
                have = torch.cuda.get_device_capability(device)
                if have < f.min_capability:
                    need, here = (".".join(map(str, c)) for c in (f.min_capability, have))
                    state, source = False, f"n/a: needs compute capability {need} (here {here})"
            states[name], sources[name] = state, source
        return cls(states, sources)

    @classmethod
    def all_off(cls) -> FusionPolicy:
        return cls({n: False for n in FUSIONS}, {n: "all off" for n in FUSIONS})

    def describe(self) -> str:
        """'name=0,...' of the fusions set by the command line or the environment, or 'default'."""
        chosen = [f"{n}={int(s)}" for n, s in self.states.items() if self.sources[n] in _CHOSEN]
        return ",".join(chosen) if chosen else "default"


_CHOSEN = ("cli", "env")

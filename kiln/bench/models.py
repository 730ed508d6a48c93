"""The `-m` values of `kiln bench` and `kiln ab`: a GGUF path, a known model name, or a synthetic
model `synthetic:PRESET:TYPE[:LAYERS]` built in memory on the bench device (no file, any size:
`synthetic:qwen3-8b:q4_k_m` benchmarks an 8B model's real shapes with random weights).

Also llama-bench's model description ("llama 8B Q4_K - Medium") and its size/params columns.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf.constants import LlamaFileType

from kiln.errors import UsageError
from kiln.gguf.model import GGUFModel

SYNTHETIC = "synthetic:"
# The standard models of Kiln's measurements (scripts/bench_standard.py, `kiln tune`): real
# shapes, random weights, built on the bench device.
STANDARD_MODELS = (
    "synthetic:qwen3-0.6b:q8_0",
    "synthetic:qwen3-8b:q4_k_m",
    "synthetic:qwen3-8b:q8_0",
    "synthetic:qwen3-30b-a3b:q4_k_m",
    "synthetic:llama3-8b:q4_0",
)


@dataclass(frozen=True)
class SyntheticSpec:
    preset: str
    qtype: str
    layers: int | None = None

    def __str__(self) -> str:
        tail = f":{self.layers}" if self.layers is not None else ""
        return f"{SYNTHETIC}{self.preset}:{self.qtype}{tail}"


def is_synthetic(value: str) -> bool:
    return value.lower().startswith(SYNTHETIC)


def parse_synthetic(value: str) -> SyntheticSpec:
    """`synthetic:PRESET:TYPE[:LAYERS]` -> SyntheticSpec; a UsageError names what is wrong and
    lists the presets and types."""
    from kiln.gguf.synthetic import PRESETS
    from kiln.quantize import parse_mix, valid_type_names

    presets = ", ".join(PRESETS)
    form = f"synthetic:PRESET:TYPE[:LAYERS], e.g. synthetic:qwen3-8b:q4_k_m (presets: {presets})"
    parts = value.split(":")
    if len(parts) not in (3, 4) or not all(parts[1:]):
        raise UsageError(f"bad synthetic model {value!r}: write {form}")
    _, preset, qtype, *rest = parts
    if preset.lower() not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} in {value!r}; presets: {presets}")
    try:
        parse_mix(qtype)
    except UsageError:
        types = ", ".join(valid_type_names())
        raise UsageError(f"unknown type {qtype!r} in {value!r}; types: {types}") from None
    layers = None
    if rest:
        try:
            layers = int(rest[0])
        except ValueError:
            layers = 0
        if layers < 1:
            raise UsageError(f"bad layer count {rest[0]!r} in {value!r}: give an integer >= 1")
        from kiln.gguf.synthetic import MAX_LAYERS

        if layers > MAX_LAYERS:
            raise UsageError(
                f"layer count {layers} in {value!r} is more than {MAX_LAYERS}, the most Kiln "
                f"builds (the deepest real models have ~126)"
            )
    return SyntheticSpec(preset.lower(), qtype.lower(), layers)


def check_model_value(value: str) -> None:
    """Fail early (before anything runs) on a bad synthetic spec or a path that does not exist;
    known model names are fetched later, when they are loaded."""
    if is_synthetic(value):
        parse_synthetic(value)
        return
    from kiln.hub import KNOWN_MODELS, check_model_file

    if value in KNOWN_MODELS:
        return
    if os.path.lexists(value):
        check_model_file(Path(value))  # a directory, FIFO or device file: its own message
        return
    if value.endswith(".gguf") or "/" in value:
        raise UsageError(f"{value}: no such GGUF file")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise UsageError(
        f"model {value!r} is neither a GGUF file, a known model name ({known}) nor a synthetic "
        f"model (synthetic:PRESET:TYPE[:LAYERS], e.g. synthetic:tiny-llama:q8_0)"
    )


def load_gguf(value: str, device: torch.device) -> tuple[GGUFModel, str]:
    """(the GGUF model, its model_filename for the results) for a `-m` value. A synthetic model
    is built on `device`, so its weights never cross the host link."""
    if is_synthetic(value):
        from kiln.gguf.synthetic import build_model

        spec = parse_synthetic(value)
        return build_model(spec.preset, spec.qtype, layers=spec.layers, device=device), str(spec)
    from kiln.gguf import read_gguf
    from kiln.hub import resolve_model

    path = resolve_model(value)
    return read_gguf(path), str(path)


@dataclass(frozen=True)
class ModelFacts:
    """What the size checks need of a -m value, known without building the model."""

    config: Any  # ModelConfig
    weight_bytes: int  # the tensors as stored (quantized)


@functools.lru_cache(maxsize=8)
def model_facts(value: str) -> ModelFacts:
    """The config and weight bytes of a -m value: a synthetic model's from its plan (no weight
    is made), a file's from its header and tensor table (memory-mapped, nothing read)."""
    if is_synthetic(value):
        from kiln.gguf.lazy import raw_nbytes
        from kiln.gguf.synthetic import get_preset, plan_tensors, preset_config, with_layers

        spec = parse_synthetic(value)
        specs = plan_tensors(spec.preset, spec.qtype, layers=spec.layers)
        config = preset_config(with_layers(get_preset(spec.preset), spec.layers))
        return ModelFacts(config, sum(raw_nbytes(s.qtype, s.shape) for s in specs))
    from kiln.gguf import read_gguf
    from kiln.hub import resolve_model

    model = read_gguf(resolve_model(value))
    return ModelFacts(model.config, model.tensor_bytes)


# -- llama-bench's descriptions -------------------------------------------------------------------
_SIZES = {"S": "Small", "M": "Medium", "L": "Large", "XS": "Extra Small", "XL": "Extra Large"}
_FTYPE_NAMES = {
    LlamaFileType.ALL_F32: "all F32",
    LlamaFileType.MOSTLY_MXFP4_MOE: "MXFP4 MoE",
    LlamaFileType.MOSTLY_IQ4_NL: "IQ4_NL - 4.5 bpw",
    LlamaFileType.MOSTLY_IQ4_XS: "IQ4_XS - 4.25 bpw",
}


def ftype_name(ftype: int | None) -> str:
    """llama.cpp's llama_model_ftype_name: 'Q4_K - Medium', 'Q8_0', 'F16', ..."""
    if ftype is None:
        return "?"
    try:
        ft = LlamaFileType(int(ftype))
    except ValueError:
        return f"ftype {ftype}"
    if ft in _FTYPE_NAMES:
        return _FTYPE_NAMES[ft]
    name = ft.name.removeprefix("MOSTLY_")
    if name == "GUESSED":
        return "(guessed)"
    head, _, size = name.rpartition("_")
    if head and size in _SIZES and "_K" in name:
        return f"{head} - {_SIZES[size]}"
    return name


def _count_label(n: float) -> str:
    """8.03e9 -> '8B', 3.3e9 -> '3.3B', 1.35e8 -> '135M'."""
    if n >= 1e9:
        x = n / 1e9
        return f"{x:.0f}B" if x >= 10 else f"{x:.1f}".rstrip("0").rstrip(".") + "B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def active_params(model: GGUFModel) -> int:
    """Parameters used per token: a MoE reads n_expert_used of its n_expert experts."""
    c = model.config
    total = model.n_params
    if not c.n_expert:
        return total
    experts = sum(t.n_elements for n, t in model.tensors.items() if "_exps." in n)
    return total - experts + experts * c.n_expert_used // c.n_expert


def describe(model: GGUFModel) -> str:
    """llama-bench's model column: architecture, size class and file type,
    e.g. 'llama 8B Q4_K - Medium' or 'qwen3moe 30B.A3.3B Q4_K - Medium'."""
    c = model.config
    size = _count_label(model.n_params)
    if c.n_expert:
        size += ".A" + _count_label(active_params(model))
    return f"{c.arch} {size} {ftype_name(model.metadata.get('general.file_type'))}"


def size_label(nbytes: int) -> str:
    """llama-bench's size column: MiB below 1 GiB, else GiB."""
    if nbytes < 1024**3:
        return f"{nbytes / 1024**2:.2f} MiB"
    return f"{nbytes / 1024**3:.2f} GiB"


def params_label(n: int) -> str:
    """llama-bench's params column: M below 1e9, else B."""
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"

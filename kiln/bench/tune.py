"""`kiln tune`: the default of each fusion whose best state depends on the GPU (`tuned` in
kiln/fusion.py), decided on this GPU by measurement and written with its evidence.

For each tuned fusion that can run here and each model (the standard five unless -m says), an
interleaved A/B (kiln/bench/ab.py) of the fusion's builtin state (A) against the other (B) on
tg128 and pp512, then the output check: identical greedy tokens for an exact fusion, the KLD
gate (kiln/bench/gate.py) for an approximate one. B wins on a model when some test is a win beyond
the run-to-run spread (the paired t-test of ab.verdict), none is a loss, and the outputs pass. The
default is flipped (B becomes this GPU's default) only when B wins on every model measured;
otherwise the builtin stays. Either way the decision and its numbers are an entry of
kernels/configs/fusions,device=<GPU>.json (with --write), which FusionPolicy reads as the
"device default" and `kiln fusions` prints with its evidence.

A write keeps the trials the file holds of other models (on this GPU model) and decides over all
of them: the standard set can be measured a model or two at a time (a machine lent for minutes,
an 8B model's trial taking one or two) and the decision is still over every model measured.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from kiln.bench import ab as AB
from kiln.bench import env
from kiln.bench import llama_bench as B
from kiln.errors import UsageError
from kiln.fileio import write_text
from kiln.fusion import FUSIONS, FusionPolicy, check_name, device_defaults_path

N_PROMPT, N_GEN = 512, 128  # the tests: pp512, tg128
CHECK_TOKENS = 128  # greedy tokens of the output check
DEFAULT_ROUNDS = 6


@dataclass(frozen=True)
class ModelTrial:
    """One fusion's A/B on one model."""

    model: str
    rows: tuple[AB.ABRow, ...]  # pp512, tg128
    outputs: str  # what the output check found
    outputs_pass: bool

    @property
    def win(self) -> bool:
        kinds = [row.verdict.kind for row in self.rows]
        return self.outputs_pass and "win" in kinds and "loss" not in kinds

    def why_not(self) -> str:
        """Why B did not win on this model ("" when it did)."""
        if self.win:
            return ""
        losses = [row.test for row in self.rows if row.verdict.kind == "loss"]
        if losses:
            return f"a loss at {', '.join(losses)}"
        if not self.outputs_pass:
            return "its outputs fail the check"
        n = min(row.verdict.n for row in self.rows)
        return f"no significant difference at n = {n} (more rounds may decide)"

    def summary(self) -> str:
        tests = "; ".join(
            f"{row.test} {statistics.fmean(row.a):.2f} -> {statistics.fmean(row.b):.2f} t/s "
            f"(B/A {row.verdict.ratio:.3f} +- {row.verdict.spread:.3f}, {row.verdict.kind}, "
            f"n = {row.verdict.n})"
            for row in self.rows
        )
        return f"-m {self.model} {tests}; outputs {self.outputs}"

    def record(self) -> dict:
        """The trial as the device file keeps it (from_record reads it back)."""
        tests = {row.test: {"a_ts": row.a, "b_ts": row.b} for row in self.rows}
        return {
            "model": self.model,
            "outputs": self.outputs,
            "outputs_pass": self.outputs_pass,
            "tests": tests,
        }

    @staticmethod
    def from_record(rec: dict) -> ModelTrial:
        rows = tuple(
            AB.ABRow(test, list(t["a_ts"]), list(t["b_ts"])) for test, t in rec["tests"].items()
        )
        return ModelTrial(rec["model"], rows, rec["outputs"], bool(rec["outputs_pass"]))


@dataclass(frozen=True)
class Decision:
    fusion: str
    builtin: bool
    on: bool
    trials: tuple[ModelTrial, ...]

    @property
    def flipped(self) -> bool:
        return self.on != self.builtin

    def evidence(self, device: str) -> str:
        state, builtin = ("on" if s else "off" for s in (self.on, self.builtin))
        verdict = (
            f"{state} (builtin {builtin}): B won on every model"
            if self.flipped
            else f"kept {state} (builtin): B did not win on every model ({self.shortfall()})"
        )
        ab = f"--fusion {self.fusion}={int(self.builtin)} vs {int(not self.builtin)}"
        trials = " | ".join(t.summary() for t in self.trials)
        return (
            f"{device}, {datetime.now(timezone.utc):%Y-%m-%d}, kiln tune ({ab}, -p {N_PROMPT} "
            f"-n {N_GEN}, interleaved): {verdict}. {trials}"
        )

    def shortfall(self) -> str:
        """Where B did not win, model by model ("" when it won everywhere)."""
        if not self.trials:
            return "no model measured"
        return "; ".join(f"{t.model}: {t.why_not()}" for t in self.trials if not t.win)


def decide(fusion: str, trials: Sequence[ModelTrial]) -> Decision:
    """Flip the builtin default only when the other state wins on every model measured."""
    builtin = FUSIONS[fusion].builtin
    flip = bool(trials) and all(t.win for t in trials)
    return Decision(fusion, builtin, builtin != flip, tuple(trials))


def tunable(names: Sequence[str] | None, device: torch.device, backend: str) -> list[str]:
    """The tuned fusions asked for (all by default) that can run here; UsageError for a name
    that is not tuned or cannot run on this device and backend."""
    policy = FusionPolicy.resolve(device, backend)
    chosen = list(names) if names else [n for n, f in FUSIONS.items() if f.tuned]
    out = []
    for name in chosen:
        check_name(name)
        if not FUSIONS[name].tuned:
            tuned = ", ".join(n for n, f in FUSIONS.items() if f.tuned)
            raise UsageError(
                f"{name} has no device-dependent default: kiln tune decides {tuned} "
                f"(compare any fusion with kiln ab)"
            )
        if policy.sources[name].startswith("n/a"):
            if names:
                raise UsageError(f"{name} cannot be tuned here: {policy.sources[name]}")
            continue
        out.append(name)
    if not out:
        raise UsageError(
            f"no tuned fusion can run on {device} with the {backend} backend: tune on a CUDA GPU "
            f"with the triton backend"
        )
    return out


def trial(
    fusion: str, model: str, rounds: int, device: str, backend: str, progress: B.Progress
) -> ModelTrial:
    f = FUSIONS[fusion]
    a = AB.parse_config(f"--fusion {fusion}={int(f.builtin)}", "A")
    b = AB.parse_config(f"--fusion {fusion}={int(not f.builtin)}", "B")
    params = AB.ABParams(
        model=model,
        a=a,
        b=b,
        n_prompt=(N_PROMPT,),
        n_gen=(N_GEN,),
        rounds=rounds,
        device=device,
        backend=backend,
        check_tokens=CHECK_TOKENS,
        check="kld" if f.approximate else "tokens",
    )
    res = AB.run_ab(params, progress)
    if res.kld is not None:
        outputs = str(res.kld)
    else:
        n = len(res.tokens["A"])
        outputs = f"greedy {n} tokens {'identical' if res.outputs_identical else 'DIFFER'}"
    return ModelTrial(model, tuple(res.rows), outputs, bool(res.outputs_pass))


def run_tune(
    models: Sequence[str],
    fusions: Sequence[str],
    rounds: int,
    device: str,
    backend: str,
    progress: B.Progress,
    report: Callable[[str], None] = print,
) -> list[Decision]:
    """Every fusion's trials on every model, then its decision (each reported as it ends)."""
    decisions = []
    for i, fusion in enumerate(fusions):
        trials = []
        for j, model in enumerate(models):
            progress.prefix = f"tune [{i + 1}/{len(fusions)}] {fusion} [{j + 1}/{len(models)}]"
            t = trial(fusion, model, rounds, device, backend, progress)
            report(f"{fusion}: {t.summary()}: {'B wins' if t.win else 'no win for B'}")
            trials.append(t)
        d = decide(fusion, trials)
        state = "on" if d.on else "off"
        kept = f"builtin kept: B did not win on {d.shortfall()}"
        report(f"{fusion}: {state} ({'flipped' if d.flipped else kept})\n")
        decisions.append(d)
    return decisions


def device_record(device: torch.device) -> dict:
    """The GPU a device file was measured on."""
    props = torch.cuda.get_device_properties(device)
    return {
        "name": torch.cuda.get_device_name(device),
        "sms": props.multi_processor_count,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "driver": env.driver(device),
        **env.versions(),
    }


def earlier_trials(path: Path, fusion: str) -> list[ModelTrial]:
    """The trials the device file at `path` holds for `fusion` ([] for none, or for an entry
    recorded by hand, which keeps its numbers as text only)."""
    if not path.exists():
        return []
    entry = json.loads(path.read_text()).get(fusion, {})
    return [ModelTrial.from_record(rec) for rec in entry.get("measured", [])]


def with_earlier(decision: Decision, earlier: Sequence[ModelTrial]) -> Decision:
    """The decision over this run's trials and the earlier ones of models it did not measure."""
    now = {t.model for t in decision.trials}
    return decide(
        decision.fusion, [t for t in earlier if t.model not in now] + list(decision.trials)
    )


def write_device_file(decisions: Sequence[Decision], gpu: dict, path: Path | None = None) -> Path:
    """The decisions into the fusion file of the GPU model `gpu` (device_record) describes,
    with their evidence and trials; entries of fusions not tuned now are kept (a decision
    that should count earlier trials is made with with_earlier first)."""
    path = path or device_defaults_path(gpu["name"])
    data = json.loads(path.read_text()) if path.exists() else {}
    short = gpu["name"].removeprefix("NVIDIA ")
    for d in decisions:
        data[d.fusion] = {
            "on": d.on,
            "evidence": d.evidence(short),
            "measured": [t.record() for t in d.trials],
        }
    data["device"] = gpu
    write_text(path, json.dumps(data, indent=1) + "\n")
    return path

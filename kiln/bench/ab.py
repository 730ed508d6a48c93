"""`kiln ab`: two configurations of the same benchmark, interleaved, and a verdict.

A configuration is a string of bench flags that set *how* the model runs: -m/--model,
-b/--batch-size, -ub/--ubatch-size, --backend, --fusion NAME=0|1, and NAME=VALUE environment
assignments (e.g. a fusion toggle KILN_<NAME>=0), applied while that configuration's model is
built and while it runs. *What* is measured (-p, -n, -pg, -d) is set once, for both.

The method: each test is made ready for A and for B (model built, KV cache allocated, depth filled,
warm-up run: kiln.bench.llama_bench.Session), then `rounds` rounds each time one repetition of
A then one of B, for every test. Interleaving spreads slow drifts (clocks, temperature, other
load) over both sides alike, where back-to-back blocks would hand them to one.

The verdict, per test, on the per-round ratios r_i = t/s(B)_i / t/s(A)_i (paired: a round's A
and B ran seconds apart), taken as logarithms so that A/B and B/A are judged alike and one odd
round weighs as a factor, not as a sum: with mean m and sample sd s of ln r_i over n rounds,
t = m / (s / sqrt(n)). |t| above Student's two-sided 95% critical value for n - 1 degrees of
freedom is a difference beyond the run-to-run spread: a win for B when m > 0, a loss when m < 0;
otherwise no significant difference. B/A is reported as exp(m) (the geometric mean of the
ratios) ± the sample sd of the ratios. Fewer than 2 rounds give no verdict.

Then each configuration generates `check_tokens` greedy tokens (argmax) from the same fixed
prompt, and the token ids are compared: a change that is meant to be arithmetic-neutral must keep
them identical. An approximate change (norm_quant's 8-bit activations) may change a token where
two were nearly tied, so `check="kld"` also decodes A's tokens one by one through both
configurations and compares their next-token distributions: the mean KL divergence of B from A
and how often their top-1 agree, passing kiln/bench/gate.py's gate (issue #14's gate of the q8_1
path).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shlex
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from kiln.bench import gate, memory
from kiln.bench import llama_bench as B
from kiln.bench import models as M
from kiln.bench.models import load_gguf
from kiln.errors import UsageError
from kiln.fusion import parse_overrides

DEFAULT_ROUNDS = 10
DEFAULT_CHECK_TOKENS = 128
PROMPT_TOKENS = 64  # more than a small -ub, so the prompt's split into micro-batches counts
PROMPT_SEED = 0

# Student's t, two-sided 95%, for 1..30 degrees of freedom
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_critical(df: int) -> float:
    """Student's t two-sided 95% critical value for df degrees of freedom."""
    if df < 1:
        return math.inf
    if df <= len(_T95):
        return _T95[df - 1]
    return 2.00 if df <= 60 else 1.98 if df <= 120 else 1.96


# -- configurations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    label: str  # "A" or "B"
    text: str  # the flags as given
    model: str | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    backend: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    fusions: tuple[tuple[str, bool], ...] = ()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise UsageError(message)


_TEST_FLAGS = {"-p", "--n-prompt", "-n", "--n-gen", "-pg", "-d", "--n-depth", "-r",
               "--repetitions", "-o", "--output", "--device"}  # fmt: skip


_VALUE_FLAGS = {"-m", "--model", "-b", "--batch-size", "-ub", "--ubatch-size", "--backend",
                "--fusion"}  # fmt: skip


def parse_config(text: str, label: str) -> Config:
    """A configuration string: bench flags -m, -b, -ub, --backend, --fusion and NAME=VALUE
    assignments."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"configuration {label} {text!r}: {e}") from None
    env: list[tuple[str, str]] = []
    flags: list[str] = []
    for i, tok in enumerate(tokens):
        name, eq, value = tok.partition("=")
        takes_value = i > 0 and tokens[i - 1] in _VALUE_FLAGS  # "--fusion swiglu=0"
        if eq and not takes_value and not tok.startswith("-") and name.replace("_", "").isalnum():
            env.append((name, value))
        else:
            flags.append(tok)
    for tok in flags:
        if tok.split("=", 1)[0] in _TEST_FLAGS:
            raise UsageError(
                f"configuration {label} sets {tok.split('=', 1)[0]}: A and B set how the model "
                f"runs (-m, -b, -ub, --backend, --fusion, NAME=VALUE); the tests (-p, -n, -pg, "
                f"-d), -r and --device are given once, outside them"
            )
    p = _Parser(prog=f"configuration {label}", add_help=False)
    p.add_argument("-m", "--model")
    p.add_argument("-b", "--batch-size")
    p.add_argument("-ub", "--ubatch-size")
    p.add_argument("--backend")
    p.add_argument("--fusion", action="append")
    ns, rest = p.parse_known_args(flags)
    if rest:
        raise UsageError(
            f"configuration {label} {text!r}: {' '.join(rest)} is not a configuration flag "
            f"(-m, -b, -ub, --backend, --fusion, NAME=VALUE)"
        )

    def one_int(value: str | None, flag: str) -> int | None:
        if value is None:
            return None
        values = B.parse_int_list([value], f"{flag} in {label}", (), minimum=1)
        if len(values) != 1:
            raise UsageError(f"configuration {label}: {flag} takes one value, got {value!r}")
        return values[0]

    if ns.model is not None:
        from kiln.bench.models import check_model_value

        check_model_value(ns.model)
    return Config(
        label=label,
        text=text,
        model=ns.model,
        n_batch=one_int(ns.batch_size, "-b"),
        n_ubatch=one_int(ns.ubatch_size, "-ub"),
        backend=ns.backend,
        env=tuple(env),
        fusions=tuple(parse_overrides(ns.fusion).items()),
    )


@contextlib.contextmanager
def applied_env(assignments: Sequence[tuple[str, str]]) -> Iterator[None]:
    """os.environ with the assignments while inside; restored after."""
    saved = {k: os.environ.get(k) for k, _ in assignments}
    try:
        os.environ.update(dict(assignments))
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- the verdict ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    ratio: float  # geometric mean of the per-round B/A
    spread: float  # sample sd of the per-round B/A
    t: float
    n: int
    kind: str  # "win", "loss", "no significant difference" or "too few rounds"

    def __str__(self) -> str:
        if self.kind in ("win", "loss"):
            return f"{self.kind}: B {100 * (self.ratio - 1):+.1f}% (t = {self.t:.1f}, n = {self.n})"
        if self.kind == "too few rounds":
            return "too few rounds for a verdict (-r 2 at least)"
        return f"no significant difference (t = {self.t:.1f}, n = {self.n})"


def verdict(a: Sequence[float], b: Sequence[float]) -> Verdict:
    """A paired t-test on the per-round log ratios of throughput (higher is better); see the
    module docstring. a, b: t/s of A and of B, round by round."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} samples of A but {len(b)} of B")
    ratios = [y / x for x, y in zip(a, b)]
    n = len(ratios)
    if n < 2:
        r = ratios[0] if ratios else math.nan
        return Verdict(r, 0.0, math.nan, n, "too few rounds")
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    se = statistics.stdev(logs) / math.sqrt(n)
    if se > 0:
        t = mean / se
    else:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    if abs(t) > t_critical(n - 1):
        kind = "win" if mean > 0 else "loss"
    else:
        kind = "no significant difference"
    return Verdict(math.exp(mean), statistics.stdev(ratios), t, n, kind)


# -- running --------------------------------------------------------------------------------------
@dataclass
class ABParams:
    model: str
    a: Config
    b: Config
    n_prompt: tuple[int, ...] = B.DEFAULT_N_PROMPT
    n_gen: tuple[int, ...] = B.DEFAULT_N_GEN
    n_pg: tuple[tuple[int, int], ...] = ()
    n_depth: tuple[int, ...] = B.DEFAULT_N_DEPTH
    rounds: int = DEFAULT_ROUNDS
    device: str = "auto"
    backend: str = "auto"
    warmup: bool = True
    check_tokens: int = DEFAULT_CHECK_TOKENS
    check: str = "tokens"  # "tokens": greedy ids identical; "kld": also the KLD gate


@dataclass(frozen=True)
class KLDCheck:
    """B's next-token distributions against A's along A's greedy tokens (decoded one by one)."""

    mean: float  # mean KL divergence of B from A per token
    top1: float  # fraction of tokens where B's argmax is A's
    n: int

    @property
    def passed(self) -> bool:
        return self.mean <= gate.KLD_MAX and self.top1 >= gate.TOP1_MIN

    def __str__(self) -> str:
        verdict = "within" if self.passed else "OUTSIDE"
        return (
            f"mean KLD {self.mean:.3g}, same top-1 {100 * self.top1:.2f}% over {self.n} tokens: "
            f"{verdict} the gate ({gate.describe()})"
        )


@dataclass
class ABRow:
    test: str
    a: list[float] = field(default_factory=list)  # t/s per round
    b: list[float] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return verdict(self.a, self.b)


@dataclass
class ABResult:
    params: ABParams
    device: torch.device
    models: dict[str, str]  # label -> -m value
    rows: list[ABRow]
    tokens: dict[str, list[int]] = field(default_factory=dict)  # label -> greedy token ids
    kld: KLDCheck | None = None  # check="kld"

    @property
    def outputs_identical(self) -> bool | None:
        if not self.tokens:
            return None
        return self.tokens["A"] == self.tokens["B"]

    @property
    def outputs_pass(self) -> bool | None:
        """The output check's verdict: identical tokens, or with check="kld" the KLD gate;
        None when nothing was compared."""
        if self.kld is not None:
            return self.kld.passed
        return self.outputs_identical


def _tests(params: ABParams, cfg: Config) -> list[B.TestInstance]:
    bp = B.BenchParams(
        models=(cfg.model or params.model,),
        n_prompt=params.n_prompt,
        n_gen=params.n_gen,
        n_pg=params.n_pg,
        n_depth=params.n_depth,
        n_batch=(cfg.n_batch or B.DEFAULT_N_BATCH[0],),
        n_ubatch=(cfg.n_ubatch or B.DEFAULT_N_UBATCH[0],),
    )
    return B.instances(bp)


def run_ab(params: ABParams, progress: B.Progress | None = None) -> ABResult:
    progress = progress or B.Progress(quiet=True)
    device = B.pick_device(params.device)
    configs = (params.a, params.b)
    tests = {c.label: _tests(params, c) for c in configs}
    if not tests["A"]:
        raise UsageError("no test to run: every -p, -n and -pg size is 0")
    check_sizes(params, device, tests)
    ggufs: dict[str, Any] = {}
    loaded: dict[str, B.LoadedModel] = {}
    runners: dict[str, B.Runner] = {}
    for c in configs:
        value = c.model or params.model
        backend = c.backend or params.backend
        with applied_env(c.env):
            if value not in ggufs:
                progress.status(f"loading {value}", keep=True)
                ggufs[value] = load_gguf(value, device)
            progress.status(f"building {c.label} ({c.text or 'defaults'})", keep=True)
            loaded[c.label] = B.build_loaded(value, *ggufs[value], device, backend, c.fusions)
        runners[c.label] = B.Runner(device, backend, 1, params.warmup, progress)
    rows = [ABRow(inst.name) for inst in tests["A"]]
    sessions: dict[str, list[B.Session]] = {}
    for c in configs:
        with applied_env(c.env):
            sessions[c.label] = [
                runners[c.label].session(loaded[c.label], inst, f"{c.label} {inst.name}")
                for inst in tests[c.label]
            ]
    for r in range(params.rounds):
        for k, row in enumerate(rows):
            for c in configs:
                progress.status(f"round {r + 1}/{params.rounds} {row.test}: {c.label}")
                session = sessions[c.label][k]
                with applied_env(c.env):
                    ns = session.time_once()
                n_tokens = session.inst.n_prompt + session.inst.n_gen
                (row.a if c.label == "A" else row.b).append(1e9 * n_tokens / ns)
    del sessions
    tokens: dict[str, list[int]] = {}
    kld = None
    if params.check_tokens > 0:
        for c in configs:
            progress.status(f"{c.label}: {params.check_tokens} greedy tokens", keep=True)
            with applied_env(c.env):
                tokens[c.label] = greedy_tokens(loaded[c.label], params.check_tokens, _ub(c))
        if params.check == "kld":
            progress.status("KL divergence of B from A along A's tokens", keep=True)
            logits = {}
            for c in configs:
                with applied_env(c.env):
                    logits[c.label] = decoded_logits(loaded[c.label], tokens["A"], _ub(c))
            kld = kld_check(logits["A"], logits["B"], tokens["A"])
    progress.clear()
    return ABResult(
        params, device, {c.label: c.model or params.model for c in configs}, rows, tokens, kld
    )


def _ub(c: Config) -> int:
    """The prompt micro-batch of a configuration (min of its -b and -ub)."""
    return min(c.n_batch or B.DEFAULT_N_BATCH[0], c.n_ubatch or B.DEFAULT_N_UBATCH[0])


def check_sizes(
    params: ABParams, device: torch.device, tests: dict[str, list[B.TestInstance]]
) -> None:
    """Before anything loads: every test of A and B within its model's context and the free
    memory (llama_bench.check_tests), and the output check's prompt + --check-tokens within the
    context too."""
    from kiln.limits import check_context

    for c in (params.a, params.b):
        B.check_tests(tests[c.label], device, c.backend or params.backend)
    if params.check_tokens > 0:
        for value in dict.fromkeys(c.model or params.model for c in (params.a, params.b)):
            n_ctx_train = M.model_facts(value).config.n_ctx_train
            check_context(
                PROMPT_TOKENS + params.check_tokens,
                n_ctx_train,
                f"the output check of {value} ({PROMPT_TOKENS} prompt tokens + --check-tokens "
                f"{params.check_tokens})",
                f"use --check-tokens {max(0, n_ctx_train - PROMPT_TOKENS)} or fewer",
            )


def fixed_prompt(lm: B.LoadedModel, n: int = PROMPT_TOKENS) -> list[int]:
    """The same token ids every time (BOS first when the model adds one)."""
    rng = random.Random(PROMPT_SEED)
    ids = [rng.randrange(lm.n_vocab) for _ in range(n)]
    if lm.bos_id is not None:
        ids[0] = lm.bos_id
    return ids


def greedy_tokens(lm: B.LoadedModel, n: int, ubatch: int = 512) -> list[int]:
    """n tokens generated by argmax from fixed_prompt, the prompt in micro-batches of ubatch."""
    from kiln.runtime.engine import Engine

    prompt = fixed_prompt(lm)
    engine = Engine(lm.model, n_ctx=len(prompt) + n, ubatch=ubatch)
    cache = engine.new_sequence()
    logits = engine.prefill(prompt, cache)
    out: list[int] = []
    for i in range(n):
        token = int(torch.argmax(logits[-1]).item())
        out.append(token)
        if i + 1 < n:
            logits = engine.decode(token, cache)
    memory.synchronize(lm.model.device)
    return out


def decoded_logits(lm: B.LoadedModel, continuation: Sequence[int], ubatch: int = 512):
    """float32 [n, n_vocab]: the next-token logits after fixed_prompt, then after each token of
    the continuation but its last, decoded one by one (the decode path, which decode-only
    fusions change; a prompt pass would not run it)."""
    from kiln.runtime.engine import Engine

    prompt = fixed_prompt(lm)
    engine = Engine(lm.model, n_ctx=len(prompt) + len(continuation), ubatch=ubatch)
    cache = engine.new_sequence()
    rows = [engine.prefill(prompt, cache)[-1:].float().clone()]
    for token in continuation[:-1]:
        rows.append(engine.decode(token, cache).float().clone())  # (a graph's buffer)
    return torch.cat(rows)


def kld_check(a_logits: torch.Tensor, b_logits: torch.Tensor, tokens: Sequence[int]) -> KLDCheck:
    """KLDCheck of B's logits against A's (the base), row by row."""
    from kiln.bench.perplexity import kld_token_values

    base = torch.log_softmax(a_logits.double(), dim=-1)
    values = kld_token_values(b_logits, base, list(tokens))
    return KLDCheck(float(values.kld.mean()), float(values.same_top.mean()), len(tokens))


# -- report ---------------------------------------------------------------------------------------
def format_report(res: ABResult) -> str:
    p = res.params
    dev = str(res.device).split(":")[0].upper()
    models = res.models
    model = models["A"] if models["A"] == models["B"] else f"A {models['A']}, B {models['B']}"
    lines = [
        f"kiln ab: {model} on {dev}, {p.rounds} rounds of A then B (interleaved)",
        f"  A: {p.a.text or '(defaults)'}",
        f"  B: {p.b.text or '(defaults)'}",
        "",
    ]
    head = ["test", "A t/s", "B t/s", "B/A", "verdict"]
    body = []
    for row in res.rows:
        v = row.verdict
        body.append(
            [
                row.test,
                _mean_sd(row.a),
                _mean_sd(row.b),
                f"{v.ratio:.3f} ± {v.spread:.3f}",
                str(v),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {1, 2, 3}

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = ["-" * (w - 1) + (":" if i in right else "-") for i, w in enumerate(widths)]
    lines += [line(head), line(rule), *(line(b) for b in body), ""]
    same = res.outputs_identical
    if same is None:
        lines.append("greedy outputs: not compared (--check-tokens 0)")
    else:
        n = len(res.tokens["A"])
        if same:
            lines.append(f"greedy outputs over {n} tokens: identical")
        else:
            a, b = res.tokens["A"], res.tokens["B"]
            first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            lines.append(
                f"greedy outputs over {n} tokens: DIFFER from token {first} "
                f"(A {a[first]}, B {b[first]})"
            )
    if res.kld is not None:
        lines.append(f"next-token distributions of B against A: {res.kld}")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def print_report(res: ABResult, out: IO[str] | None = None) -> None:
    out = out if out is not None else sys.stdout
    out.write(format_report(res) + "\n")
    out.flush()

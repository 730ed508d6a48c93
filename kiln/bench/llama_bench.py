"""`kiln bench`: throughput measured the way llama.cpp's llama-bench measures it
(tools/llama-bench/llama-bench.cpp), with its flags, test names, columns and field names, so the
numbers and the tables compare one to one.

The method, per test (one combination of the list flags):
- an Engine whose context holds exactly n_depth + n_prompt + n_gen tokens, its KV cache allocated
  up front (llama-bench creates its context the same way);
- the depth fill: n_depth random tokens prefilled once, not timed; each repetition starts from
  the cache cut back to n_depth (llama-bench restores the state it saved at that depth);
- a warm-up, not counted: the whole prompt for a pp test, one generated token for a tg test;
- r repetitions, each timed from the clock read to the clock read after the device finished:
  pp = the prompt prefilled in batches of n_batch tokens (each split by the engine into
  micro-batches of min(n_batch, n_ubatch)), logits of each batch's last token only; tg = n_gen
  single-token decode steps, the device synchronized after each (as a generating loop must);
  pp+tg = both, one after the other;
- token ids are random (the first is BOS when the model adds BOS), t/s = tokens / time per
  repetition, reported as mean and sample standard deviation over the repetitions.

Beyond llama-bench:
- -npl (llama-batched-bench's flag: parallel sequences, B): each test runs B sequences of the
  same sizes at once, the depth filled in each; pp = the B prompts together (one stream of
  B * n_prompt tokens, sequence after sequence, in calls of n_batch tokens and forwards of
  min(n_batch, n_ubatch), as llama-batched-bench feeds its batch), tg = n_gen decode steps of
  all B sequences at once (Engine.decode_batch); t/s is the aggregate, B * tokens / time
  (llama-batched-bench's S_PP, S_TG);
- for tg tests the bytes a decode step reads (the weights once, plus the K/V of every row at its
  length, averaged over the steps) x steps/s (GB/s), and its share of the copy bandwidth measured
  in the same run (see kiln.bench.memory); the peak GPU memory.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

import torch

from kiln.bench import env, memory
from kiln.bench import models as M
from kiln.errors import UsageError
from kiln.llm import pick_device

FORMATS = ("md", "csv", "json", "jsonl")
DEFAULT_N_PROMPT = (512,)
DEFAULT_N_GEN = (128,)
DEFAULT_N_DEPTH = (0,)
DEFAULT_N_BATCH = (2048,)
DEFAULT_N_UBATCH = (512,)
DEFAULT_N_PARALLEL = (1,)
# llama.cpp's limit on parallel sequences (LLAMA_MAX_SEQ, llama-cparams.h): every -npl value
# kiln bench accepts is one llama-batched-bench can run too. Memory is checked separately
# (check_tests counts B KV caches).
MAX_PARALLEL = 256
DEFAULT_REPS = 5
SEED = 1234  # token ids are random but the same from run to run


# -- parameters ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchParams:
    models: tuple[str, ...]
    n_prompt: tuple[int, ...] = DEFAULT_N_PROMPT
    n_gen: tuple[int, ...] = DEFAULT_N_GEN
    n_pg: tuple[tuple[int, int], ...] = ()
    n_depth: tuple[int, ...] = DEFAULT_N_DEPTH
    n_batch: tuple[int, ...] = DEFAULT_N_BATCH
    n_ubatch: tuple[int, ...] = DEFAULT_N_UBATCH
    reps: int = DEFAULT_REPS
    output: str = "md"
    device: str = "auto"
    backend: str = "auto"
    warmup: bool = True
    fusions: tuple[Fusions, ...] = ((),)  # each a set of --fusion overrides, swept like -ub
    n_parallel: tuple[int, ...] = DEFAULT_N_PARALLEL  # -npl: sequences decoded together
    type_k: tuple[str | None, ...] = (None,)  # -ctk: K cache types (None: the backend's)
    type_v: tuple[str | None, ...] = (None,)  # -ctv: V cache types


Fusions = tuple[tuple[str, bool], ...]  # (name, on) overrides, hashable


@dataclass(frozen=True)
class TestInstance:
    model: str  # the -m value
    n_prompt: int
    n_gen: int
    n_depth: int
    n_batch: int
    n_ubatch: int
    fusions: Fusions = ()
    n_parallel: int = 1  # B: sequences run together, each with these sizes
    type_k: str | None = None  # the K / V cache types (kiln/quant/kv.py; None: the backend's)
    type_v: str | None = None

    @property
    def fusion_label(self) -> str:
        return ",".join(f"{n}={int(on)}" for n, on in self.fusions) or "default"

    @property
    def name(self) -> str:
        return test_name(self.n_prompt, self.n_gen, self.n_depth)

    @property
    def label(self) -> str:
        """The name, with the number of parallel sequences when not 1 (progress, errors)."""
        return self.name + (f" npl{self.n_parallel}" if self.n_parallel != 1 else "")

    @property
    def n_ctx(self) -> int:
        """The context of each of the B sequences."""
        return max(1, self.n_depth + self.n_prompt + self.n_gen)


def test_name(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    """llama-bench's test names: pp512, tg128, pp512+tg128, each with ' @ d4096' at a depth."""
    if n_prompt > 0 and n_gen == 0:
        name = f"pp{n_prompt}"
    elif n_gen > 0 and n_prompt == 0:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return name + (f" @ d{n_depth}" if n_depth > 0 else "")


_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?:([+*])(\d+))?)?$")


def parse_int_list(
    values: Iterable[str] | None, flag: str, default: tuple[int, ...], minimum: int = 0
) -> tuple[int, ...]:
    """Repeated and comma-separated values of a list flag; llama-bench's ranges too:
    `first-last` (step 1), `first-last+step`, `first-last*factor`."""
    if not values:
        return default
    out: list[int] = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            m = _RANGE.match(item)
            if not m:
                if re.fullmatch(r"-\d+", item):
                    raise UsageError(f"{flag} must be >= {minimum}, got {item}")
                raise UsageError(
                    f"bad value {item!r} for {flag}: give integers separated by commas, or a "
                    f"range first-last[+step|*factor]"
                )
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) is not None else first
            op, step = m.group(3) or "+", int(m.group(4) or 1)
            if last < first or (op == "+" and step < 1) or (op == "*" and (step < 2 or first < 1)):
                raise UsageError(f"bad range {item!r} for {flag}")
            i = first
            while i <= last:
                out.append(i)
                i = i + step if op == "+" else i * step
    bad = [v for v in out if v < minimum]
    if bad:
        raise UsageError(f"{flag} must be >= {minimum}, got {bad[0]}")
    return tuple(out)


def parse_pairs(values: Iterable[str] | None) -> tuple[tuple[int, int], ...]:
    """-pg PP,TG (repeatable)."""
    out = []
    for value in values or ():
        parts = str(value).split(",")
        if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p.strip()) for p in parts):
            raise UsageError(f"bad value {value!r} for -pg: give PP,TG, e.g. -pg 512,128")
        pp, tg = (int(p) for p in parts)
        if pp < 0 or tg < 0:
            raise UsageError(f"-pg sizes must be >= 0, got {value}")
        out.append((pp, tg))
    return tuple(out)


def parse_reps(value: str | int | None, flag: str = "-r") -> int:
    if value is None:
        return DEFAULT_REPS
    try:
        reps = int(value)
    except ValueError:
        raise UsageError(f"bad value {value!r} for {flag}: give an integer >= 1") from None
    if reps < 1:
        raise UsageError(f"{flag} (repetitions) must be >= 1, got {reps}")
    return reps


def parse_parallel(values: Iterable[str] | None) -> tuple[int, ...]:
    """-npl: the numbers of parallel sequences, a list flag like -p (each 1..MAX_PARALLEL)."""
    out = parse_int_list(values, "-npl", DEFAULT_N_PARALLEL, minimum=1)
    big = [v for v in out if v > MAX_PARALLEL]
    if big:
        raise UsageError(
            f"-npl must be <= {MAX_PARALLEL} (llama.cpp's limit on parallel sequences), got "
            f"{big[0]}"
        )
    return out


def parse_cache_types(values: Iterable[str] | None, flag: str) -> tuple[str | None, ...]:
    """-ctk / -ctv: cache type names, a list flag like -ub (default: the backend's type)."""
    from kiln.quant.kv import cache_type

    if not values:
        return (None,)
    names = [v.strip() for value in values for v in str(value).split(",")]
    return tuple(cache_type(n, f"cache type for {flag}").name for n in names)


def parse_output(value: str | None) -> str:
    value = "md" if value is None else value
    if value not in FORMATS:
        raise UsageError(f"unknown output format {value!r} for -o; formats: {', '.join(FORMATS)}")
    return value


def parse_models(values: Iterable[str] | None, default: str) -> tuple[str, ...]:
    out = [m.strip() for v in (values or [default]) for m in str(v).split(",") if m.strip()]
    if not out:
        raise UsageError("-m needs a model: a GGUF path, a known name or synthetic:PRESET:TYPE")
    for m in out:
        M.check_model_value(m)
    return tuple(out)


def instances(params: BenchParams) -> list[TestInstance]:
    """Every combination of the list values, in llama-bench's order (each model's tests
    together, so it loads once; then each fusion set's, so it builds once): model, fusions,
    batch, ubatch, K and V cache types, depth, then the pp, tg and pg tests, each for every -npl
    value (innermost, as llama-batched-bench's pl: a test's batch sizes side by side); sizes of
    0 are skipped."""
    tests = [(p, 0) for p in params.n_prompt if p > 0]
    tests += [(0, n) for n in params.n_gen if n > 0]
    tests += [(p, n) for p, n in params.n_pg if p > 0 or n > 0]
    return [
        TestInstance(m, p, n, nd, nb, nub, fu, b, tk, tv)
        for m in params.models
        for fu in params.fusions
        for nb in params.n_batch
        for nub in params.n_ubatch
        for tk in params.type_k
        for tv in params.type_v
        for nd in params.n_depth
        for p, n in tests
        for b in params.n_parallel
    ]


# -- results -------------------------------------------------------------------------------------
@dataclass
class TestResult:
    inst: TestInstance
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    backend: str
    device: str  # "cpu", "cuda:0"
    device_name: str
    bytes_per_token: int
    copy_bandwidth: float  # bytes/s, measured in the same run
    samples_ns: list[int] = field(default_factory=list)
    peak_memory: int | None = None  # bytes; None on the CPU
    test_time: str = ""
    build_commit: str = env.UNKNOWN
    build_number: int = 0
    n_threads: int = 0
    kv_bytes_per_token: int = 0  # K and V of one position, every layer, as the cache stores them
    type_k: str = ""  # the K / V cache types the test ran with (kiln/quant/kv.py names)
    type_v: str = ""

    @property
    def test(self) -> str:
        return self.inst.name

    @property
    def n_parallel(self) -> int:
        return self.inst.n_parallel

    @property
    def n_tokens(self) -> int:
        """Tokens of one repetition, all B sequences: t/s is the aggregate."""
        return self.inst.n_parallel * (self.inst.n_prompt + self.inst.n_gen)

    @property
    def samples_ts(self) -> list[float]:
        return [1e9 * self.n_tokens / t for t in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts) if self.samples_ns else 0.0

    @property
    def stddev_ts(self) -> float:
        return _stdev(self.samples_ts)

    @property
    def avg_ns(self) -> int:
        return int(statistics.fmean(self.samples_ns)) if self.samples_ns else 0

    @property
    def stddev_ns(self) -> int:
        return int(_stdev([float(s) for s in self.samples_ns]))

    @property
    def is_tg(self) -> bool:
        return self.inst.n_prompt == 0 and self.inst.n_gen > 0

    @property
    def kv_bytes_per_step(self) -> int | None:
        """K/V bytes the attention of one decode step reads, all B rows, averaged over the
        n_gen steps (tg tests only): step i reads n_depth + i + 1 positions of each row."""
        if not self.is_tg:
            return None
        i = self.inst
        return round(i.n_parallel * self.kv_bytes_per_token * (i.n_depth + (i.n_gen + 1) / 2))

    @property
    def bytes_per_step(self) -> int | None:
        """Bytes one decode step reads (tg tests only): the weights once for all B rows
        (bytes_per_token) plus every row's K/V."""
        kv = self.kv_bytes_per_step
        return None if kv is None else self.bytes_per_token + kv

    @property
    def read_rate(self) -> float | None:
        """Bytes read per second while generating: bytes per step x steps/s, where steps/s =
        t/s / B (tg tests only)."""
        step = self.bytes_per_step
        return None if step is None else step * self.avg_ts / self.inst.n_parallel

    @property
    def gbps(self) -> float | None:
        """Bytes read per second while generating (tg tests only), GB/s."""
        rate = self.read_rate
        return None if rate is None else rate / 1e9

    @property
    def floor_pct(self) -> float | None:
        """Achieved GB/s as a percentage of the measured copy bandwidth (tg tests only)."""
        rate = self.read_rate
        if rate is None or self.copy_bandwidth <= 0:
            return None
        return 100 * rate / self.copy_bandwidth

    def fields(self, samples: bool = False) -> dict[str, Any]:
        """llama-bench's fields (names and order) where they exist, then Kiln's."""
        i = self.inst
        out: dict[str, Any] = {
            "build_commit": self.build_commit,
            "build_number": self.build_number,
            "cpu_info": env.cpu_name(),
            "gpu_info": env.gpu_names(),
            "backends": self.backend,
            "model_filename": self.model_filename,
            "model_type": self.model_type,
            "model_size": self.model_size,
            "model_n_params": self.model_n_params,
            "n_batch": i.n_batch,
            "n_ubatch": i.n_ubatch,
            "n_threads": self.n_threads,
            "n_prompt": i.n_prompt,
            "n_gen": i.n_gen,
            "n_depth": i.n_depth,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "fusions": i.fusion_label,
            "test_time": self.test_time,
            "avg_ns": self.avg_ns,
            "stddev_ns": self.stddev_ns,
            "avg_ts": self.avg_ts,
            "stddev_ts": self.stddev_ts,
            # Kiln's own
            "test": self.test,
            "n_parallel": i.n_parallel,
            "device": self.device,
            "device_name": self.device_name,
            **env.versions(),
            "bytes_per_token": self.bytes_per_token,
            "kv_bytes_per_step": self.kv_bytes_per_step,
            "copy_gbps": self.copy_bandwidth / 1e9,
            "gbps": self.gbps,
            "floor_pct": self.floor_pct,
            "peak_memory": self.peak_memory,
        }
        if samples:
            out["samples_ns"] = list(self.samples_ns)
            out["samples_ts"] = self.samples_ts
        return out


def _stdev(values: list[float]) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than 2 values: llama-bench's stdev."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


# -- running -------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    value: str  # the -m value
    filename: str
    model: Any  # DecoderModel
    model_type: str
    size: int
    n_params: int
    bytes_per_token: int
    n_vocab: int
    bos_id: int | None  # the prompt's first token when the model adds BOS
    fusions: Fusions = ()


def load_model(
    value: str, device: torch.device, backend: str, fusions: Fusions = ()
) -> LoadedModel:
    gguf, filename = M.load_gguf(value, device)
    return build_loaded(value, gguf, filename, device, backend, fusions)


def build_loaded(
    value: str,
    gguf: Any,
    filename: str,
    device: torch.device,
    backend: str,
    fusions: Fusions = (),
) -> LoadedModel:
    """A GGUFModel built for `device` with its bench facts (two builds of one GGUFModel share
    its raw weights)."""
    from kiln.models import build_model

    meta = gguf.metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    model = build_model(gguf, device, backend=backend, fusions=dict(fusions))
    return LoadedModel(
        value=value,
        filename=filename,
        model=model,
        fusions=fusions,
        model_type=M.describe(gguf),
        size=gguf.tensor_bytes,
        n_params=gguf.n_params,
        bytes_per_token=memory.model_bytes_per_token(gguf),
        n_vocab=gguf.config.n_vocab,
        bos_id=int(bos) if add_bos and bos is not None else None,
    )


class Runner:
    """Runs tests on one device; `on_timed(inst, cache)` (for tests) is called right before
    each repetition's clock starts."""

    def __init__(
        self,
        device: torch.device,
        backend: str = "auto",
        reps: int = DEFAULT_REPS,
        warmup: bool = True,
        progress: Progress | None = None,
        on_timed: Callable[[TestInstance, Any], None] | None = None,
    ):
        from kiln.ops import resolve_backend

        self.device, self.reps, self.warmup = device, reps, warmup
        self.backend = resolve_backend(backend, device)
        self.progress = progress or Progress(quiet=True)
        self.on_timed = on_timed
        self.rng = random.Random(SEED)
        self._copy_bandwidth: float | None = None
        self._git: env.GitState | None = None

    @property
    def copy_bandwidth(self) -> float:
        if self._copy_bandwidth is None:
            self.progress.status("measuring the copy bandwidth", keep=True)
            self._copy_bandwidth = memory.copy_bandwidth(self.device)
        return self._copy_bandwidth

    @property
    def git(self) -> env.GitState:
        if self._git is None:
            self._git = env.git_state()
        return self._git

    def load(self, value: str, fusions: Fusions = ()) -> LoadedModel:
        self.progress.status(f"loading {value}", keep=True)
        start = time.perf_counter()
        loaded = load_model(value, self.device, self.backend, fusions)
        self.progress.status(f"loaded {value} in {time.perf_counter() - start:.1f} s", keep=True)
        return loaded

    def new_result(self, lm: LoadedModel, inst: TestInstance) -> TestResult:
        from kiln.limits import kv_cache_bytes
        from kiln.runtime.engine import kv_cache_types

        dev = self.device
        config = lm.model.config
        k_type, v_type = kv_cache_types(lm.model.ops.name, config, inst.type_k, inst.type_v)
        return TestResult(
            inst=inst,
            model_filename=lm.filename,
            model_type=lm.model_type,
            model_size=lm.size,
            model_n_params=lm.n_params,
            backend=self.backend,
            device=str(dev),
            device_name=env.device_name(dev),
            bytes_per_token=lm.bytes_per_token,
            copy_bandwidth=self.copy_bandwidth,
            test_time=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            build_commit=self.git.short,
            build_number=self.git.number,
            n_threads=env.threads(),
            kv_bytes_per_token=kv_cache_bytes(config, 1, k_type, v_type),
            type_k=k_type.name,
            type_v=v_type.name,
        )

    def session(self, lm: LoadedModel, inst: TestInstance, what: str = "") -> Session:
        """A test made ready to be timed: engine, KV cache, depth fill and warm-up done."""
        return Session(self, lm, inst, what or f"{lm.value} {inst.label}")

    def run(self, lm: LoadedModel, inst: TestInstance, label: str = "") -> TestResult:
        """One test: its session, then `reps` timed repetitions."""
        result = self.new_result(lm, inst)
        memory.reset_peak_memory(self.device)
        what = f"{label}{lm.value} {inst.label}"
        session = self.session(lm, inst, what)
        for r in range(self.reps):
            self.progress.status(f"{what}: run {r + 1}/{self.reps}")
            result.samples_ns.append(session.time_once())
        result.peak_memory = memory.peak_memory(self.device)
        return result


class Session:
    """One test on one model, ready to time: an Engine of B sequences whose context each holds
    exactly the test's tokens, their KV blocks reserved up front, the depth filled in each
    (untimed) and the warm-up run."""

    def __init__(self, runner: Runner, lm: LoadedModel, inst: TestInstance, what: str):
        from kiln.runtime.engine import Engine

        self.runner, self.lm, self.inst = runner, lm, inst
        self.device = runner.device
        self.rng = runner.rng
        self.engine = Engine(
            lm.model,
            n_ctx=inst.n_ctx,
            ubatch=min(inst.n_batch, inst.n_ubatch),
            n_seq=inst.n_parallel,
            cache_type_k=inst.type_k,
            cache_type_v=inst.type_v,
        )
        self.seqs = [self.engine.new_sequence() for _ in range(inst.n_parallel)]
        self.cache = self.seqs[0]  # what on_timed is shown (B = 1: the only sequence)
        self._reserve()
        if inst.n_depth:
            runner.progress.status(f"{what}: depth fill of {inst.n_depth} tokens")
            self.prompt(inst.n_depth)
        if runner.warmup:
            runner.progress.status(f"{what}: warm-up")
            if inst.n_prompt:
                self.prompt(inst.n_prompt)
            if inst.n_gen:
                self.gen(1)

    def _reserve(self) -> None:
        """Blocks for the rest of every sequence's context now: nothing is allocated while
        the clock runs."""
        for seq in self.seqs:
            self.engine.reserve(seq, self.inst.n_ctx - seq.length)

    def time_once(self) -> int:
        """One timed repetition from depth n_depth -> nanoseconds."""
        inst = self.inst
        # llama-bench restores the state saved at the depth; cut back in reverse so that each
        # sequence is given back the blocks it had (the pool hands out the last freed first)
        for seq in reversed(self.seqs):
            seq.truncate(inst.n_depth)
        self._reserve()
        if self.runner.on_timed is not None:
            self.runner.on_timed(inst, self.cache)
        memory.synchronize(self.device)
        t0 = time.perf_counter_ns()
        if inst.n_prompt:
            self.prompt(inst.n_prompt)
        if inst.n_gen:
            self.gen(inst.n_gen)
        memory.synchronize(self.device)
        return max(time.perf_counter_ns() - t0, 1)

    def prompt(self, n: int) -> None:
        """n random tokens for each of the B sequences (BOS first where the model adds it),
        processed together as llama-batched-bench does: one stream of B * n tokens, sequence
        after sequence, in calls of n_batch tokens (llama-bench's test_prompt), each call in
        forwards of min(n_batch, n_ubatch) tokens that may hold pieces of several sequences
        (Engine.step); the logits of each call's last forward only. B = 1: Engine.prefill's
        forwards exactly."""
        lm, n_batch, ubatch = self.lm, self.inst.n_batch, self.engine.ubatch
        stream: list[tuple[int, int]] = []  # (sequence index, token)
        for k in range(len(self.seqs)):
            ids = [self.rng.randrange(lm.n_vocab) for _ in range(n)]
            if lm.bos_id is not None:
                ids[0] = lm.bos_id
            stream += [(k, t) for t in ids]
        for s in range(0, len(stream), n_batch):
            call = stream[s : s + n_batch]
            for u in range(0, len(call), ubatch):
                last = u + ubatch >= len(call)
                self.engine.step(self._entries(call[u : u + ubatch]), "last" if last else "none")
        memory.synchronize(self.device)

    def _entries(self, piece: list[tuple[int, int]]) -> list[tuple[Any, list[int]]]:
        """Consecutive (sequence index, token) pairs -> Engine.step's (sequence, ids) entries."""
        entries: list[tuple[Any, list[int]]] = []
        prev = -1
        for k, t in piece:
            if k != prev:
                entries.append((self.seqs[k], []))
                prev = k
            entries[-1][1].append(t)
        return entries

    def gen(self, n: int) -> None:
        """n decode steps of all B sequences at once (Engine.decode_batch: one token each),
        synchronized after each (llama-bench's test_gen; llama-batched-bench's tg loop)."""
        lm, b = self.lm, len(self.seqs)
        tokens = [
            lm.bos_id if lm.bos_id is not None else self.rng.randrange(lm.n_vocab) for _ in range(b)
        ]
        for _ in range(n):
            self.engine.decode_batch(tokens, self.seqs)
            memory.synchronize(self.device)
            tokens = [self.rng.randrange(lm.n_vocab) for _ in range(b)]


def run_tests(
    runner: Runner, tests: list[TestInstance], on_result: Callable[[TestResult], None]
) -> list[TestResult]:
    """Run every test, loading each model once for its consecutive tests."""
    results: list[TestResult] = []
    lm: LoadedModel | None = None
    for k, inst in enumerate(tests):
        if lm is None or lm.value != inst.model or lm.fusions != inst.fusions:
            lm = None
            free_memory(runner.device)
            lm = runner.load(inst.model, inst.fusions)
        try:
            result = runner.run(lm, inst, label=f"[{k + 1}/{len(tests)}] ")
        except torch.cuda.OutOfMemoryError:
            raise UsageError(
                f"out of GPU memory in {inst.model} {inst.label}: use a smaller model, fewer "
                f"tokens (-p, -n, -d) or fewer parallel sequences (-npl)"
            ) from None
        results.append(result)
        runner.progress.clear()
        on_result(result)
    return results


def check_tests(tests: list[TestInstance], device: torch.device, backend: str = "auto") -> None:
    """Before anything runs: each model's longest test (depth + prompt + generated tokens) must
    fit the context the model was trained on, and its weights plus its largest KV pool (B
    sequences of that test's context, kv_pool_tokens) the free memory of `device`
    (kiln.limits; a lower bound of what the test allocates)."""
    from kiln.limits import check_context, check_memory, gib, kv_cache_bytes
    from kiln.ops import resolve_backend
    from kiln.runtime.engine import kv_cache_types

    longest: dict[str, TestInstance] = {}
    largest: dict[str, TestInstance] = {}
    for inst in tests:
        if inst.model not in longest or inst.n_ctx > longest[inst.model].n_ctx:
            longest[inst.model] = inst
        if inst.model not in largest or _pool_tokens(inst) > _pool_tokens(largest[inst.model]):
            largest[inst.model] = inst
    backend = resolve_backend(backend, device)
    for value, inst in longest.items():
        facts = M.model_facts(value)
        # every test's cache types against this model's head sizes and the backend
        types = {(t.type_k, t.type_v) for t in tests if t.model == value}
        widest = max(
            (kv_cache_types(backend, facts.config, k, v) for k, v in types),
            key=lambda kv: kv_cache_bytes(facts.config, 1, *kv),
        )
        check_context(
            inst.n_ctx,
            facts.config.n_ctx_train,
            f"{value} {inst.name}",
            "lower -d, -p, -n or -pg (a test's context is its depth + prompt + generated tokens)",
        )
        inst = largest[value]
        kv = kv_cache_bytes(facts.config, _pool_tokens(inst), *widest)
        seqs = f"{inst.n_parallel} x " if inst.n_parallel != 1 else ""
        check_memory(
            facts.weight_bytes + kv,
            device,
            f"{value} {inst.label} (weights {gib(facts.weight_bytes)} + a KV cache of "
            f"{seqs}{inst.n_ctx} tokens, {gib(kv)})",
            "lower -npl, -d, -p, -n or -pg, or use a smaller model (fewer layers: "
            "synthetic:PRESET:TYPE:LAYERS)",
        )


def kv_pool_tokens(n_ctx: int, n_seq: int) -> int:
    """Rows of the KV pool of an Engine of n_seq sequences of n_ctx tokens when full."""
    from kiln.runtime.kv_pool import full_pool_rows

    return full_pool_rows(n_ctx, n_seq)


def _pool_tokens(inst: TestInstance) -> int:
    return kv_pool_tokens(inst.n_ctx, inst.n_parallel)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(
    params: BenchParams,
    out: IO[str] | None = None,
    progress: Progress | None = None,
    on_timed: Callable[[TestInstance, Any], None] | None = None,
    on_result: Callable[[TestResult], None] | None = None,
) -> list[TestResult]:
    """Run every test of `params` and print the results to `out` in params.output as they come;
    on_result(result) is called after each is printed (e.g. to record it)."""
    out = out if out is not None else sys.stdout
    device = pick_device(params.device)
    tests = instances(params)
    if not tests:
        raise UsageError("no test to run: every -p, -n and -pg size is 0")
    check_tests(tests, device, params.backend)
    runner = Runner(device, params.backend, params.reps, params.warmup, progress, on_timed)
    printer = make_printer(params.output, out, md_columns(params, device))
    printer.header()

    def done(result: TestResult) -> None:
        printer.row(result)
        if on_result is not None:
            on_result(result)

    try:
        results = run_tests(runner, tests, done)
    finally:
        runner.progress.clear()
    printer.footer(runner)
    return results


# -- progress ------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr: rewritten in place (\\r) on a terminal; elsewhere only the
    lines marked keep=True or a test's first line are printed, one per line."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False, prefix: str = "bench"):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet, self.prefix = quiet, prefix
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False
        self._last_test = ""

    def status(self, text: str, keep: bool = False) -> None:
        if self.quiet:
            return
        line = f"kiln {self.prefix}: {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.shown = True
        else:
            test = text.split(": ", 1)[0]
            if keep or test != self._last_test:
                self.stream.write(line + "\n")
            self._last_test = test
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


# -- output --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MdColumn:
    field: str
    title: str
    width: int  # negative: left-aligned (llama-bench's convention)


# llama-bench's columns and widths, then Kiln's
_MD_MODEL = [MdColumn("model", "model", -30), MdColumn("size", "size", 10),
             MdColumn("params", "params", 10), MdColumn("backend", "backend", -10)]  # fmt: skip
_MD_TAIL = [MdColumn("test", "test", 15), MdColumn("t/s", "t/s", 20),
            MdColumn("gbps", "GB/s", 8), MdColumn("floor", "% floor", 7),
            MdColumn("peak", "peak mem", 10)]  # fmt: skip


def md_columns(params: BenchParams, device: torch.device) -> list[MdColumn]:
    """llama-bench's choice: threads on a CPU backend, n_batch / n_ubatch when they are swept
    or not the default; the fusion sets when given; npl when some -npl value is not 1 (so a
    table without -npl is llama-bench's)."""
    cols = list(_MD_MODEL)
    if device.type == "cpu":
        cols.append(MdColumn("n_threads", "threads", 7))
    if params.n_batch != DEFAULT_N_BATCH:
        cols.append(MdColumn("n_batch", "n_batch", 7))
    if params.n_ubatch != DEFAULT_N_UBATCH:
        cols.append(MdColumn("n_ubatch", "n_ubatch", 8))
    if params.fusions != ((),):
        width = max(len("fusion"), *(len(TestInstance("", 0, 0, 0, 0, 0, f).fusion_label)
                                     for f in params.fusions))  # fmt: skip
        cols.append(MdColumn("fusions", "fusion", -width))
    if params.type_k != (None,):
        cols.append(MdColumn("type_k", "type_k", 6))
    if params.type_v != (None,):
        cols.append(MdColumn("type_v", "type_v", 6))
    if any(b != 1 for b in params.n_parallel):
        cols.append(MdColumn("n_parallel", "npl", 4))
    return cols + _MD_TAIL


def md_cells(r: TestResult) -> dict[str, str]:
    gbps, floor = r.gbps, r.floor_pct
    return {
        "model": r.model_type,
        "size": M.size_label(r.model_size),
        "params": M.params_label(r.model_n_params),
        "backend": f"{r.backend} {r.device.split(':')[0].upper()}",
        "n_threads": str(r.n_threads),
        "n_batch": str(r.inst.n_batch),
        "n_ubatch": str(r.inst.n_ubatch),
        "fusions": r.inst.fusion_label,
        "type_k": r.type_k,
        "type_v": r.type_v,
        "n_parallel": str(r.inst.n_parallel),
        "test": r.test,
        "t/s": f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
        "gbps": "-" if gbps is None else f"{gbps:.2f}" if gbps < 10 else f"{gbps:.1f}",
        "floor": f"{floor:.1f}" if floor is not None else "-",
        "peak": M.size_label(r.peak_memory) if r.peak_memory is not None else "-",
    }


def md_line(cells: list[str], cols: list[MdColumn]) -> str:
    parts = [f"{c:<{-col.width}}" if col.width < 0 else f"{c:>{col.width}}"
             for c, col in zip(cells, cols)]  # fmt: skip
    return "| " + " | ".join(parts) + " |"


class Printer:
    def __init__(self, out: IO[str], columns: list[MdColumn] | None = None):
        self.out, self.columns = out, columns or []

    def header(self) -> None:
        pass

    def row(self, r: TestResult) -> None:
        raise NotImplementedError

    def footer(self, runner: Runner) -> None:
        pass

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class MarkdownPrinter(Printer):
    def header(self) -> None:
        cols = self.columns
        rule = [("-" * (abs(c.width) - 1)) + (":" if c.width > 0 else "-") for c in cols]
        self._write(md_line([c.title for c in cols], cols) + "\n" + md_line(rule, cols) + "\n")

    def row(self, r: TestResult) -> None:
        cells = md_cells(r)
        self._write(md_line([cells[c.field] for c in self.columns], self.columns) + "\n")

    def footer(self, runner: Runner) -> None:
        git = runner.git
        dirty = ", dirty" if git.dirty else ""
        bw = runner._copy_bandwidth
        lines = [f"\nbuild: {git.short} ({git.number}{dirty})"]
        if bw is not None:
            lines.append(
                f"memory floor: copy bandwidth {bw / 1e9:.1f} GB/s measured on "
                f"{env.device_name(runner.device)}; GB/s = bytes per decode step (weights "
                f"+ K/V) x steps/s"
            )
        self._write("\n".join(lines) + "\n")


class CsvPrinter(Printer):
    def __init__(self, out: IO[str], columns: list[MdColumn] | None = None):
        super().__init__(out, columns)
        self._fields: list[str] | None = None

    def row(self, r: TestResult) -> None:
        data = r.fields()
        buf = io.StringIO()
        writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        if self._fields is None:
            self._fields = list(data)
            writer.writerow(self._fields)
        writer.writerow(["" if data[k] is None else data[k] for k in self._fields])
        self._write(buf.getvalue())


class JsonPrinter(Printer):
    def __init__(self, out: IO[str], columns: list[MdColumn] | None = None):
        super().__init__(out, columns)
        self.first = True

    def header(self) -> None:
        self._write("[\n")

    def row(self, r: TestResult) -> None:
        body = json.dumps(r.fields(samples=True), indent=2)
        body = "\n".join("  " + line for line in body.splitlines())
        self._write(("" if self.first else ",\n") + body)
        self.first = False

    def footer(self, runner: Runner) -> None:
        self._write("\n]\n")


class JsonlPrinter(Printer):
    def row(self, r: TestResult) -> None:
        self._write(json.dumps(r.fields(samples=True)) + "\n")


def make_printer(fmt: str, out: IO[str], columns: list[MdColumn] | None = None) -> Printer:
    cls = {"md": MarkdownPrinter, "csv": CsvPrinter, "json": JsonPrinter, "jsonl": JsonlPrinter}
    return cls[parse_output(fmt)](out, columns)

"""Prompt processing and generation speed against the depth of the KV cache, measured the way
ik_llama.cpp's sweep-bench measures them (examples/sweep-bench/sweep-bench.cpp), so the tables
compare one to one and a table printed by sweep-bench can be overlaid on a kiln plot.

The method, for a context of n_kv_max tokens, a micro-batch of `ubatch` tokens (PP) and
`n_gen` generated tokens (TG, default ubatch / 4 as sweep-bench):
- warm up (one PP of `ubatch` tokens and one decode, not timed) and empty the cache;
- for N_KV = 0, ubatch, 2 * ubatch, ... while a step fits (N_KV + max(ubatch, n_gen) <= n_ctx):
  - TG: `n_gen` single-token decodes of random ids at positions N_KV .., synchronizing the device
    after each (llama_synchronize in sweep-bench), timed from the first to the last;
  - the TG tokens are removed from the cache (back to length N_KV);
  - PP: one forward pass of `ubatch` random ids at positions N_KV .. N_KV + ubatch - 1, timed;
  - the PP tokens stay: the next step starts right after them.
- a row: PP, TG, N_KV, T_PP s, S_PP t/s = PP / T_PP, T_TG s, S_TG t/s = TG / T_TG.

Both TG and PP of a row start at depth N_KV. sweep-bench loops while N_KV < n_kv_max, which with
n_kv_max a multiple of ubatch is the same set of rows (c / ub of them); other sizes end at the
last step that fits instead of failing. The random ids come from a seeded generator, so two runs
feed the same tokens.

Results are printed as sweep-bench's markdown table or as JSON lines with sweep-bench's keys
(`--output-format jsonl`: n_kv_max, n_batch, n_ubatch, pp, tg, n_kv, t_pp, speed_pp, t_tg,
speed_tg) plus kiln's (model, device, backend). `read_sweeps` reads back either, and also
llama-bench tables whose tests are `ppN @ dD` / `tgN @ dD` (llama-bench -d), for overlays.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.errors import UsageError
from kiln.fileio import atomic_output, read_input_text

if TYPE_CHECKING:
    from kiln.runtime.engine import Engine
    from kiln.runtime.kv_pool import Sequence

DEFAULT_CTX = 4096  # like LLM's default; never more than the model was trained on
DEFAULT_UBATCH = 512  # sweep-bench's -ub default


@dataclass(frozen=True)
class SweepRow:
    """One step of a sweep: `pp` tokens processed and `tg` generated, both from depth `n_kv`."""

    pp: int
    tg: int
    n_kv: int
    t_pp: float  # seconds
    speed_pp: float  # tokens/s
    t_tg: float
    speed_tg: float


@dataclass(frozen=True)
class SweepInfo:
    """What a run was: sweep-bench's header line and kiln's model, device and backend."""

    n_kv_max: int
    n_ubatch: int
    n_gen: int
    model: str = ""
    device: str = ""
    backend: str = ""
    n_threads: int = field(default_factory=torch.get_num_threads)

    def header_line(self) -> str:
        return (
            f"sweep: n_kv_max = {self.n_kv_max}, n_batch = {self.n_ubatch}, "
            f"n_ubatch = {self.n_ubatch}, n_gen = {self.n_gen}, model = {self.model}, "
            f"device = {self.device}, backend = {self.backend}, n_threads = {self.n_threads}"
        )


# -- the plan -------------------------------------------------------------------------------------
def default_n_gen(ubatch: int) -> int:
    """sweep-bench's TG size when -n is not given: ubatch / 4 (at least one token)."""
    return max(1, ubatch // 4)


def check_sweep_args(n_ctx: int | None, ubatch: int, n_gen: int | None) -> None:
    """Raise UsageError for sizes that give no measurement. n_ctx None: not known yet."""
    if ubatch <= 0:
        raise UsageError(f"the micro-batch (-ub) must be > 0, got {ubatch}")
    if n_gen is not None and n_gen <= 0:
        raise UsageError(f"the tokens generated per step (-n) must be > 0, got {n_gen}")
    if n_ctx is None:
        return
    if n_ctx <= 0:
        raise UsageError(f"the context size (-c) must be > 0, got {n_ctx}")
    n = n_gen if n_gen is not None else default_n_gen(ubatch)
    if n_ctx < max(ubatch, n):
        what = f"the micro-batch -ub {ubatch}" if ubatch >= n else f"-n {n}"
        raise UsageError(
            f"the context -c {n_ctx} is smaller than {what}: no step fits; "
            f"raise -c or lower -ub / -n"
        )


def sweep_depths(n_ctx: int, ubatch: int, n_gen: int) -> list[int]:
    """N_KV of each step: 0, ubatch, 2 * ubatch, ... while N_KV + max(ubatch, n_gen) <= n_ctx."""
    check_sweep_args(n_ctx, ubatch, n_gen)
    need = max(ubatch, n_gen)
    return list(range(0, n_ctx - need + 1, ubatch))


# -- the measurement ------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so the clock reads finished work (CPU ops are sync)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sweep(
    engine: Engine,
    n_gen: int | None = None,
    *,
    seed: int = 0,
    warmup: bool = True,
    cache: Sequence | None = None,
) -> Iterator[SweepRow]:
    """Measure every step of the sweep over engine.n_ctx in micro-batches of engine.ubatch;
    yields each row as soon as it is measured."""
    ubatch, n_ctx = engine.ubatch, engine.n_ctx
    n_gen = n_gen if n_gen is not None else default_n_gen(ubatch)
    depths = sweep_depths(n_ctx, ubatch, n_gen)
    n_vocab, device = engine.config.n_vocab, engine.device
    gen = torch.Generator().manual_seed(seed)

    def random_ids(n: int) -> list[int]:
        return torch.randint(n_vocab, (n,), generator=gen).tolist()

    if cache is None:
        cache = engine.new_sequence()
    cache.truncate(0)
    engine.reserve(cache, n_ctx)  # the pool at its full size now: no growth in a timed step
    if warmup:  # first calls pay for allocations and (on a GPU) kernel compilation
        engine.prefill(random_ids(ubatch), cache)
        engine.decode(random_ids(1)[0], cache)
        synchronize(device)
        cache.truncate(0)
    for n_kv in depths:
        _expect(cache, n_kv, "before the step")
        tg_ids = random_ids(n_gen)
        synchronize(device)
        start = time.perf_counter()
        for token in tg_ids:
            engine.decode(token, cache)
            synchronize(device)
        t_tg = time.perf_counter() - start
        _expect(cache, n_kv + n_gen, "after TG")
        cache.truncate(n_kv)  # sweep-bench's llama_kv_cache_seq_rm(ctx, 0, n_kv, -1)

        pp_ids = random_ids(ubatch)
        synchronize(device)
        start = time.perf_counter()
        engine.prefill(pp_ids, cache)
        synchronize(device)
        t_pp = time.perf_counter() - start
        _expect(cache, n_kv + ubatch, "after PP")
        yield SweepRow(ubatch, n_gen, n_kv, t_pp, ubatch / t_pp, t_tg, n_gen / t_tg)


def _expect(cache: Sequence, length: int, when: str) -> None:
    if cache.length != length:
        raise RuntimeError(f"sweep: the cache holds {cache.length} tokens {when}, not {length}")


# -- loading a model ------------------------------------------------------------------------------
def load_engine(
    spec: str,
    device: str = "auto",
    backend: str = "auto",
    n_ctx: int | None = None,
    ubatch: int = DEFAULT_UBATCH,
    fusions: dict[str, bool] | None = None,
    cache_types: tuple[str | None, str | None] = (None, None),
) -> tuple[Engine, str]:
    """(the Engine a sweep runs on, the model's name) for a -m value: a GGUF path, a known model
    name, or synthetic:PRESET:TYPE[:LAYERS] built on the device (kiln.bench.models, shared with
    kiln bench). n_ctx defaults to min(4096, the model's trained context); cache_types: -ctk,
    -ctv (None: the backend's default)."""
    from kiln.bench.models import check_model_value, is_synthetic, load_gguf
    from kiln.llm import pick_device
    from kiln.models import build_model
    from kiln.runtime.engine import Engine

    check_model_value(spec)
    dev = pick_device(device)
    gguf_model, name = load_gguf(spec, dev)
    n_train = gguf_model.config.n_ctx_train
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, n_train)
    elif n_ctx > n_train:
        raise UsageError(f"-c {n_ctx} exceeds the {n_train} tokens {name} was trained on")
    from kiln.limits import check_memory, gib, kv_cache_bytes
    from kiln.ops import resolve_backend
    from kiln.runtime.engine import kv_cache_types

    # the sweep fills the whole context
    k_type, v_type = kv_cache_types(resolve_backend(backend, dev), gguf_model.config, *cache_types)
    kv = kv_cache_bytes(gguf_model.config, n_ctx, k_type, v_type)
    # a synthetic model is already in memory; a file's weights are about to be loaded
    weights = 0 if is_synthetic(spec) else gguf_model.tensor_bytes
    check_memory(
        weights + kv,
        dev,
        f"a sweep of {name} to -c {n_ctx} (weights {gib(weights)} + a KV cache of {gib(kv)})",
        "lower -c or use a smaller model",
    )
    model = build_model(gguf_model, dev, backend=backend, fusions=fusions)
    engine = Engine(model, n_ctx=n_ctx, ubatch=ubatch, cache_type_k=k_type, cache_type_v=v_type)
    return engine, name


# -- output: sweep-bench's table and JSON lines ---------------------------------------------------
COLUMNS = ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s")
_WIDTHS = (6, 6, 6, 8, 8, 8, 8)


def table_header() -> str:
    """sweep-bench's two header lines."""
    head = "|" + " | ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, _WIDTHS)) + " |"
    rule = "|" + "-|-".join("-" * w for w in _WIDTHS) + "-|"
    return f"{head}\n{rule}"


def format_row(row: SweepRow) -> str:
    return (
        f"|{row.pp:6d} | {row.tg:6d} | {row.n_kv:6d} | {row.t_pp:8.3f} | {row.speed_pp:8.2f} | "
        f"{row.t_tg:8.3f} | {row.speed_tg:8.2f} |"
    )


def format_table(rows: list[SweepRow]) -> str:
    return "\n".join([table_header(), *(format_row(r) for r in rows)])


def row_json(row: SweepRow, info: SweepInfo) -> str:
    """One JSON line: sweep-bench's jsonl keys, then kiln's."""
    record: dict[str, Any] = {
        "n_kv_max": info.n_kv_max,
        "n_batch": info.n_ubatch,
        "n_ubatch": info.n_ubatch,
        "n_threads": info.n_threads,
        **asdict(row),
        "model": info.model,
        "device": info.device,
        "backend": info.backend,
    }
    return json.dumps(record)


# -- reading results back (overlays) --------------------------------------------------------------
@dataclass(frozen=True)
class SweepSeries:
    """The rows of one run read from a file; `name` tells runs of one file apart ("" if one)."""

    name: str
    rows: list[SweepRow]


# A sweep file holds a few hundred rows; anything this large is not one (and /dev/zero ends).
MAX_SWEEP_BYTES = 64 << 20


def read_sweeps(path: str | os.PathLike[str]) -> list[SweepSeries]:
    """Runs saved by kiln sweep (jsonl), printed by sweep-bench (markdown or jsonl), or a
    llama-bench markdown table of `ppN @ dD` / `tgN @ dD` tests."""
    p = Path(path)
    text = read_input_text(p, "the sweep file", MAX_SWEEP_BYTES, errors="replace")
    return parse_sweeps(text, str(p))


def parse_sweeps(text: str, source: str = "<text>") -> list[SweepSeries]:
    for parse in (_parse_jsonl, _parse_sweep_table, _parse_llama_bench_table):
        found = parse(text, source)
        if found:
            return found
    raise UsageError(
        f"{source}: no sweep found: expected kiln sweep / sweep-bench JSON lines, a sweep-bench "
        f"markdown table (| PP | TG | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s |) or a "
        f"llama-bench table with 'ppN @ dD' / 'tgN @ dD' tests"
    )


def parse_sweep_table(text: str, source: str = "<text>") -> list[SweepRow]:
    """The rows of the first sweep-bench markdown table in `text` (log lines around it are
    skipped; columns are found by name, so sweep-bench's RSS / VRAM columns do no harm)."""
    found = _parse_sweep_table(text, source)
    if not found:
        raise UsageError(f"{source}: no sweep-bench table (| PP | TG | N_KV | ... |) found")
    return found[0].rows


def _parse_jsonl(text: str, source: str) -> list[SweepSeries]:
    runs: dict[tuple, list[SweepRow]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("{"):
            continue  # sweep-bench's log lines around its JSON
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{source}:{number}: bad JSON line: {e.msg}") from None
        if not isinstance(record, dict) or "n_kv" not in record:
            continue
        try:
            row = _row_from_json(record)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{source}:{number}: not a sweep row ({e})") from None
        key = tuple(str(record.get(k, "")) for k in ("model", "device", "backend"))
        key += (str(record.get("n_ubatch", "")), str(record.get("n_kv_max", "")))
        runs.setdefault(key, []).append(row)
    return _named(runs, ("model", "device", "backend", "ub", "c"))


def _row_from_json(r: dict[str, Any]) -> SweepRow:
    pp, tg = int(r.get("pp", 0)), int(r.get("tg", 0))
    speed_pp, speed_tg = float(r["speed_pp"]), float(r["speed_tg"])
    t_pp = float(r["t_pp"]) if "t_pp" in r else _seconds(pp, speed_pp)
    t_tg = float(r["t_tg"]) if "t_tg" in r else _seconds(tg, speed_tg)
    return SweepRow(pp, tg, int(r["n_kv"]), t_pp, speed_pp, t_tg, speed_tg)


def _named(runs: dict[tuple, list[SweepRow]], fields: tuple[str, ...]) -> list[SweepSeries]:
    """One series per run; names list only the fields that differ between the runs."""
    keys = list(runs)
    if len(keys) <= 1:
        return [SweepSeries("", rows) for rows in runs.values()]
    differ = [i for i in range(len(fields)) if len({k[i] for k in keys}) > 1]
    return [SweepSeries(" ".join(f"{fields[i]}={k[i]}" for i in differ), runs[k]) for k in keys]


def _table_blocks(text: str) -> Iterator[tuple[int, list[str], list[list[str]]]]:
    """(line number, header cells, data rows) of each markdown table in `text`."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            header = _cells(line)
            rows, j = [], i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_cells(lines[j].strip()))
                j += 1
            yield i + 1, header, rows
            i = j
        else:
            i += 1


def _cells(line: str) -> list[str]:
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [c.strip() for c in inner.split("|")]


def _is_rule(line: str) -> bool:
    line = line.strip()
    return line.startswith("|") and all(re.fullmatch(r":?-+:?", c) for c in _cells(line))


def _parse_sweep_table(text: str, source: str) -> list[SweepSeries]:
    need = ("N_KV", "S_PP t/s", "S_TG t/s")
    for line_no, header, rows in _table_blocks(text):
        names = [h.upper() for h in header]
        if not all(n.upper() in names for n in need):
            continue
        col = {n: names.index(n.upper()) for n in COLUMNS if n.upper() in names}
        out = []
        for k, cells in enumerate(rows):
            where = f"{source}:{line_no + 2 + k}"
            if len(cells) != len(header):
                raise UsageError(f"{where}: {len(cells)} cells, the header has {len(header)}")
            out.append(_table_row(cells, col, where))
        if out:
            return [SweepSeries("", out)]
    return []


def _table_row(cells: list[str], col: dict[str, int], where: str) -> SweepRow:
    def num(name: str) -> float:
        return _number(cells[col[name]], where, name) if name in col else math.nan

    pp, tg = num("PP"), num("TG")
    speed_pp, speed_tg = num("S_PP t/s"), num("S_TG t/s")
    t_pp = num("T_PP s") if "T_PP s" in col else _seconds(pp, speed_pp)
    t_tg = num("T_TG s") if "T_TG s" in col else _seconds(tg, speed_tg)
    return SweepRow(_int(pp), _int(tg), int(num("N_KV")), t_pp, speed_pp, t_tg, speed_tg)


_BENCH_TEST = re.compile(r"^(pp|tg)(\d+)(?:\s*@\s*d(\d+))?$")


_MEASURED = ("gb/s", "% floor", "peak mem")


def _parse_llama_bench_table(text: str, source: str) -> list[SweepSeries]:
    """llama-bench's markdown: rows of `ppN @ dD` / `tgN @ dD` become one sweep row per depth D
    (per configuration: the columns other than test and t/s)."""
    for line_no, header, rows in _table_blocks(text):
        names = [h.lower() for h in header]
        if "test" not in names or "t/s" not in names:
            continue
        i_test, i_speed = names.index("test"), names.index("t/s")
        # Per-row measurements (kiln bench's GB/s, % floor, peak mem) do not name a configuration.
        measured = {i_test, i_speed} | {names.index(c) for c in _MEASURED if c in names}
        other = [i for i in range(len(header)) if i not in measured]
        runs: dict[tuple, dict[int, dict[str, float]]] = {}
        for k, cells in enumerate(rows):
            if len(cells) != len(header):
                continue
            m = _BENCH_TEST.match(cells[i_test])
            if not m:
                continue  # pp512+tg128 and the like have no depth to plot against
            kind, n, depth = m.group(1), int(m.group(2)), int(m.group(3) or 0)
            speed = _number(cells[i_speed].split("±")[0], f"{source}:{line_no + 2 + k}", "t/s")
            step = runs.setdefault(tuple(cells[i] for i in other), {}).setdefault(depth, {})
            step[kind], step[kind + "_n"] = speed, n
        if runs:
            series: dict[tuple, list[SweepRow]] = {}
            for key, steps in runs.items():
                series[key] = [_bench_row(d, s) for d, s in sorted(steps.items())]
            return _named(series, tuple(header[i] for i in other))
    return []


def _bench_row(depth: int, step: dict[str, float]) -> SweepRow:
    pp, tg = int(step.get("pp_n", 0)), int(step.get("tg_n", 0))
    speed_pp, speed_tg = step.get("pp", math.nan), step.get("tg", math.nan)
    return SweepRow(
        pp, tg, depth, _seconds(pp, speed_pp), speed_pp, _seconds(tg, speed_tg), speed_tg
    )


def _number(cell: str, where: str, name: str) -> float:
    cell = cell.strip()
    if cell.lower() in ("", "n/a", "nan", "-"):
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise UsageError(f"{where}: {name} is {cell!r}, not a number") from None


def _int(x: float) -> int:
    return 0 if math.isnan(x) else int(x)


def _seconds(n: float, speed: float) -> float:
    return n / speed if speed and not math.isnan(speed) and not math.isnan(n) else math.nan


# -- the command's loop ---------------------------------------------------------------------------
def run_and_print(
    engine: Engine,
    info: SweepInfo,
    n_gen: int,
    output: str = "md",
    save: str | os.PathLike[str] | None = None,
    seed: int = 0,
    warmup: bool = True,
    out: Any = None,
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """Run the sweep, printing each row as it is measured (and appending it to `save`)."""
    out = out if out is not None else sys.stdout
    if output == "md":
        print(f"\n{info.header_line()}\n", file=out)
        print(table_header(), file=out, flush=True)
    rows: list[SweepRow] = []
    with contextlib.ExitStack() as stack:
        # the saved file appears whole when the sweep ends (an interrupted sweep leaves none;
        # its rows are on stdout)
        saved = stack.enter_context(atomic_output(save, "w", what="the sweep")) if save else None
        for row in run_sweep(engine, n_gen, seed=seed, warmup=warmup):
            rows.append(row)
            print(format_row(row) if output == "md" else row_json(row, info), file=out, flush=True)
            if saved:
                saved.write(row_json(row, info) + "\n")
            if on_row:
                on_row(row)
    return rows

"""`kiln bench` (kiln.bench.llama_bench): llama-bench's test names, list flags and output formats,
the depth fill, the -ub sweep, the memory floor's byte counting, parallel sequences (-npl: the
aggregate t/s, the batches the engine is given, the column, the memory check, the history), and
bad input. Tiny synthetic models and tiny sizes on the CPU: a few seconds of benchmarking in
all."""

from __future__ import annotations

import csv
import io
import json
import re
import time
import types

import pytest
import torch

from kiln.bench import llama_bench as B
from kiln.bench import memory
from kiln.bench import models as M
from kiln.cli import main
from kiln.errors import UsageError
from kiln.limits import kv_cache_bytes
from kiln.runtime.engine import Engine

TINY = "synthetic:tiny-llama:q8_0"
_BUILT: dict[tuple[str, str], tuple] = {}
_real_load_gguf = M.load_gguf


def cached_load_gguf(value: str, device: torch.device):
    """M.load_gguf, each synthetic model built once per test session (building costs ~1.5 s)."""
    key = (value, str(device))
    if key not in _BUILT:
        _BUILT[key] = _real_load_gguf(value, device)
    return _BUILT[key]


@pytest.fixture(autouse=True)
def fast_bench(monkeypatch):
    """Reuse built models; measure the copy bandwidth on 8 MiB instead of 256."""
    monkeypatch.setattr(M, "load_gguf", cached_load_gguf)
    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    monkeypatch.setattr(memory, "COPY_REPS", 2)


def _params(**kw) -> B.BenchParams:
    base = dict(models=(TINY,), n_prompt=(8,), n_gen=(4,), reps=2, device="cpu")
    return B.BenchParams(**{**base, **kw})


@pytest.fixture(scope="module")
def results() -> list[B.TestResult]:
    """pp8, tg4 and pp8+tg4 of the tiny llama, 2 repetitions each."""
    mp = pytest.MonkeyPatch()
    mp.setattr(M, "load_gguf", cached_load_gguf)
    mp.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    try:
        return B.run_bench(_params(n_pg=((8, 4),)), out=io.StringIO())
    finally:
        mp.undo()


# -- names and flags ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("p", "n", "d", "name"),
    [
        (512, 0, 0, "pp512"),
        (0, 128, 0, "tg128"),
        (512, 128, 0, "pp512+tg128"),
        (0, 128, 4096, "tg128 @ d4096"),
        (512, 0, 4096, "pp512 @ d4096"),
    ],
)
def test_test_names_are_llama_benchs(p, n, d, name):
    assert B.test_name(p, n, d) == name


def test_list_flags_take_commas_repeats_and_ranges():
    assert B.parse_int_list(["64,128", "256"], "-p", (512,)) == (64, 128, 256)
    assert B.parse_int_list(None, "-p", (512,)) == (512,)
    assert B.parse_int_list(["1-4"], "-d", ()) == (1, 2, 3, 4)
    assert B.parse_int_list(["0-1024+512"], "-d", ()) == (0, 512, 1024)
    assert B.parse_int_list(["32-256*2"], "-ub", (), minimum=1) == (32, 64, 128, 256)
    assert B.parse_pairs(["512,128", "64,16"]) == ((512, 128), (64, 16))
    with pytest.raises(UsageError, match=">= 0"):
        B.parse_int_list(["-5"], "-p", ())
    with pytest.raises(UsageError, match=">= 1"):
        B.parse_int_list(["0"], "-ub", (), minimum=1)
    with pytest.raises(UsageError, match="bad value"):
        B.parse_int_list(["12x"], "-n", ())
    with pytest.raises(UsageError, match="PP,TG"):
        B.parse_pairs(["512"])


def test_every_combination_is_a_test_in_llama_benchs_order():
    params = _params(
        models=("a.gguf", "b.gguf"), n_prompt=(8, 0), n_gen=(4,), n_pg=((8, 4),),
        n_depth=(0, 16), n_ubatch=(4, 8),
    )  # fmt: skip
    tests = B.instances(params)
    assert len(tests) == 2 * 2 * 2 * 3  # models x ubatch x depth x (pp8, tg4, pp8+tg4); pp0 skipped
    assert [t.model for t in tests[:12]] == ["a.gguf"] * 12
    first = tests[:3]
    assert [t.name for t in first] == ["pp8", "tg4", "pp8+tg4"]
    assert {t.n_ubatch for t in tests[:6]} == {4} and tests[3].name == "pp8 @ d16"


# -- running --------------------------------------------------------------------------------------
def test_depth_fill_precedes_every_timed_run():
    seen: list[tuple[str, int]] = []
    out = io.StringIO()
    res = B.run_bench(
        _params(n_prompt=(4,), n_gen=(2,), n_depth=(12,)),
        out=out,
        on_timed=lambda inst, cache: seen.append((inst.name, cache.length)),
    )
    assert [r.test for r in res] == ["pp4 @ d12", "tg2 @ d12"]
    assert seen == [("pp4 @ d12", 12)] * 2 + [("tg2 @ d12", 12)] * 2
    assert all(len(r.samples_ns) == 2 and min(r.samples_ns) > 0 for r in res)
    assert "pp4 @ d12" in out.getvalue() and "tg2 @ d12" in out.getvalue()


def test_ubatch_sweep_gives_one_row_per_value():
    out = io.StringIO()
    res = B.run_bench(_params(n_gen=(0,), n_ubatch=(2, 4, 8), reps=1), out=out)
    assert [(r.test, r.inst.n_ubatch) for r in res] == [("pp8", 2), ("pp8", 4), ("pp8", 8)]
    header, _, *rows = [ln for ln in out.getvalue().splitlines() if ln.startswith("|")]
    assert "n_ubatch" in _cells(header)  # shown because it is not the default
    assert [_cells(r)[_cells(header).index("n_ubatch")] for r in rows] == ["2", "4", "8"]


def test_results_carry_llama_benchs_statistics(results):
    pp, tg, pg = results
    assert (pp.test, tg.test, pg.test) == ("pp8", "tg4", "pp8+tg4")
    for r in results:
        ts = [1e9 * r.n_tokens / s for s in r.samples_ns]
        assert r.avg_ts == pytest.approx(sum(ts) / len(ts))
        mean = sum(ts) / 2
        assert r.stddev_ts == pytest.approx((sum((t - mean) ** 2 for t in ts) / 1) ** 0.5)
    assert pg.n_tokens == 12
    # GB/s and % of the floor for tg tests only: the weights once per step, plus the K/V the
    # step reads (tg4: positions 1..4, 2.5 on average; float32 on the CPU); no peak GPU memory
    # on the CPU
    kv = kv_cache_bytes(M.model_facts(TINY).config, 1, torch.float32)
    assert tg.kv_bytes_per_step == round(2.5 * kv) and pp.kv_bytes_per_step is None
    assert tg.gbps == pytest.approx((tg.bytes_per_token + 2.5 * kv) * tg.avg_ts / 1e9, rel=1e-6)
    assert tg.floor_pct == pytest.approx(100 * tg.gbps * 1e9 / tg.copy_bandwidth)
    assert pp.gbps is None and pg.floor_pct is None and tg.peak_memory is None


# -- output formats -------------------------------------------------------------------------------
LLAMA_BENCH_HEAD = ["model", "size", "params", "backend", "threads", "test", "t/s"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_lines_up_with_llama_benchs_header(capsys):
    code = main(["bench", "-m", TINY, "-p", "8", "-n", "4", "-r", "2", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("|")]
    header, rule, *rows = table
    names = _cells(header)
    assert names[: len(LLAMA_BENCH_HEAD)] == LLAMA_BENCH_HEAD
    assert names[len(LLAMA_BENCH_HEAD) :] == ["GB/s", "% floor", "peak mem"]
    assert all(set(c) <= set("-:") for c in _cells(rule))
    bars = [m.start() for m in re.finditer(r"\|", header)]
    for line in table:  # every | in the same column: the table lines up in a terminal
        assert [m.start() for m in re.finditer(r"\|", line)] == bars
    rows = [dict(zip(names, _cells(r))) for r in rows]
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    assert rows[0]["model"] == "llama 1M Q8_0" and rows[0]["backend"] == "cpu CPU"
    assert rows[0]["size"].endswith(" MiB") and rows[0]["params"].endswith(" M")
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", rows[1]["t/s"])
    assert rows[0]["GB/s"] == "-" and rows[1]["GB/s"] != "-" and rows[1]["peak mem"] == "-"
    assert re.search(r"^build: \w+ \(\d+", out, re.M)


def _render(fmt: str, results) -> str:
    out = io.StringIO()
    printer = B.make_printer(fmt, out, B.md_columns(_params(), torch.device("cpu")))
    printer.header()
    for r in results:
        printer.row(r)
    printer.footer(B.Runner(torch.device("cpu")))
    return out.getvalue()


LLAMA_FIELDS = ["model_filename", "model_type", "model_size", "model_n_params", "n_batch",
                "n_ubatch", "n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts"]  # fmt: skip


def test_csv_parses_with_llama_benchs_fields(results):
    rows = list(csv.DictReader(io.StringIO(_render("csv", results))))
    assert len(rows) == 3
    for name in LLAMA_FIELDS + ["build_commit", "test_time", "avg_ns", "test", "floor_pct"]:
        assert name in rows[0]
    assert rows[1]["n_gen"] == "4" and rows[1]["model_filename"] == TINY
    assert float(rows[1]["avg_ts"]) == pytest.approx(results[1].avg_ts)
    assert rows[0]["gbps"] == "" and float(rows[1]["gbps"]) > 0


def test_json_and_jsonl_parse_with_samples(results):
    data = json.loads(_render("json", results))
    lines = [json.loads(ln) for ln in _render("jsonl", results).splitlines()]
    for records in (data, lines):
        assert [r["test"] for r in records] == ["pp8", "tg4", "pp8+tg4"]
        for r in records:
            assert all(name in r for name in LLAMA_FIELDS)
            assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
            assert isinstance(r["model_size"], int) and isinstance(r["avg_ts"], float)
        assert records[0]["peak_memory"] is None and records[1]["floor_pct"] > 0


def test_progress_rewrites_one_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = B.Progress(stream)
        p.status("[1/2] m pp8: warm-up")
        p.status("[1/2] m pp8: run 1/2")
        p.status("[2/2] m tg4: run 1/2")
        p.clear()
    assert tty.getvalue().count("\r\x1b[K") == 4 and "\n" not in tty.getvalue()
    assert log.getvalue().splitlines() == ["kiln bench: [1/2] m pp8: warm-up",
                                           "kiln bench: [2/2] m tg4: run 1/2"]  # fmt: skip


# -- the memory floor -----------------------------------------------------------------------------
def test_bytes_per_token_of_the_demo_model(demo_model):
    """SmolLM2-135M Q4_1: 30 layers of Q4_1 matrices (20 B per 32 values) and F32 norms, a Q8_0
    token_embd (34 B per 32) tied to the output, so every byte is read once per token."""
    from kiln.gguf import read_gguf

    model = read_gguf(demo_model)
    per_layer = (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576) * 20 // 32 + 2 * 576 * 4
    embd = 49152 * 576 * 34 // 32
    want = 30 * per_layer + 576 * 4 + embd
    assert want == 96_576_768 == model.tensor_bytes
    assert memory.model_bytes_per_token(model) == want
    tensors = [(t.name, t.nbytes, t.shape) for t in model.tensors.values()]
    # untied, token_embd would cost one row (612 B) per token
    assert memory.bytes_per_token(tensors, tied_output=False) == want - embd + 612


def test_bytes_per_token_counts_used_experts_only():
    tensors = [
        ("token_embd.weight", 1000, (100, 10)),  # untied: one row, 10 B
        ("output.weight", 1000, (100, 10)),
        ("blk.0.ffn_gate_inp.weight", 160, (4, 40)),  # the router: read whole
        ("blk.0.ffn_up_exps.weight", 4000, (4, 10, 100)),  # 2 of 4 experts: 2000
        ("blk.0.ffn_down_exps.weight", 4000, (4, 100, 10)),
        ("blk.0.attn_norm.weight", 40, (10,)),
    ]
    got = memory.bytes_per_token(tensors, tied_output=False, n_expert=4, n_expert_used=2)
    assert got == 10 + 1000 + 160 + 2000 + 2000 + 40


def test_synthetic_moe_model_reads_its_used_experts():
    model, name = cached_load_gguf("synthetic:tiny-qwen3moe:q8_0", torch.device("cpu"))
    assert name == "synthetic:tiny-qwen3moe:q8_0"
    exps = sum(t.nbytes for n, t in model.tensors.items() if "_exps." in n)
    embd = model.tensors["token_embd.weight"]
    want = model.tensor_bytes - exps // 2 - embd.nbytes + embd.nbytes // embd.shape[0]
    assert memory.model_bytes_per_token(model) == want
    assert M.describe(model).startswith("qwen3moe ") and ".A" in M.describe(model)


def test_copy_bandwidth_is_a_positive_rate():
    bw = memory.copy_bandwidth(torch.device("cpu"), nbytes=4 << 20, reps=2)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s


def test_descriptions_follow_llama_cpp():
    assert M.ftype_name(15) == "Q4_K - Medium"  # MOSTLY_Q4_K_M
    assert M.ftype_name(7) == "Q8_0"
    assert M.ftype_name(0) == "all F32"
    assert M.size_label(96_576_768) == "92.10 MiB" and M.size_label(5 << 30) == "5.00 GiB"
    assert M.params_label(134_515_008) == "134.52 M" and M.params_label(8_030_261_248) == "8.03 B"


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["-m", "no-such-model"], "neither a GGUF file"),
        (["-m", "synthetic:gpt5:q8_0"], "presets: llama3-8b"),
        (["-m", "synthetic:tiny-llama:q9_9"], "unknown type 'q9_9'"),
        (["-m", "synthetic:tiny-llama"], "synthetic:PRESET:TYPE"),
        (["-m", "synthetic:tiny-llama:q8_0:0"], "layer count"),
        (["-r", "0"], "must be >= 1"),
        (["-r", "two"], "bad value 'two'"),
        (["-p", "-5"], "-p must be >= 0"),
        (["-n", "-1"], "-n must be >= 0"),
        (["-d", "-4"], "-d must be >= 0"),
        (["-ub", "0"], "-ub must be >= 1"),
        (["-pg", "8"], "PP,TG"),
        (["-o", "xml"], "unknown output format 'xml'"),
        (["-npl", "0"], "-npl must be >= 1"),
        (["-npl", "2,300"], "-npl must be <= 256"),
        (["-npl", "two"], "bad value 'two' for -npl"),
        (["-p", "0", "-n", "0"], "no test to run"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, flags, words):
    args = ["bench", "-m", TINY, "-r", "1", "--device", "cpu", *flags]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1


# -- parallel sequences (-npl) --------------------------------------------------------------------
def test_npl_is_a_list_flag_of_1_to_256():
    assert B.parse_parallel(None) == (1,)
    assert B.parse_parallel(["1,2", "4-16*2"]) == (1, 2, 4, 8, 16)
    assert B.parse_parallel(["256"]) == (256,)
    for bad, words in [(["0"], ">= 1"), (["-2"], ">= 1"), (["257"], "<= 256"), (["1-3,x"], "bad")]:
        with pytest.raises(UsageError, match=words):
            B.parse_parallel(bad)


def test_npl_varies_innermost_as_llama_batched_benchs_pl():
    tests = B.instances(_params(n_prompt=(8,), n_gen=(4,), n_depth=(0, 2), n_parallel=(1, 4)))
    assert [(t.name, t.n_parallel) for t in tests[:4]] == [
        ("pp8", 1), ("pp8", 4), ("tg4", 1), ("tg4", 4)
    ]  # fmt: skip
    assert [t.name for t in tests[4:]] == ["pp8 @ d2"] * 2 + ["tg4 @ d2"] * 2
    assert tests[1].n_ctx == 8 and tests[1].label == "pp8 npl4"  # the context is per sequence


@pytest.fixture
def fake_clock(monkeypatch):
    """Every timed repetition takes exactly 1 s (the clock advances 1 s per read)."""
    ticks = iter(range(0, 10**15, 10**9))
    clock = types.SimpleNamespace(
        perf_counter=time.perf_counter, perf_counter_ns=lambda: next(ticks)
    )
    monkeypatch.setattr(B, "time", clock)


def test_tg_decodes_all_sequences_together_and_reports_the_aggregate(monkeypatch, fake_clock):
    """B = 4, -n 8 at depth 3: one warm-up decode_batch, then 8 timed ones, each of the 4
    sequences at the same position; t/s = 4 x 8 tokens / 1 s; the bytes of a step are the
    weights once plus the 4 rows' K/V."""
    calls: list[list[int]] = []
    decode_batch = Engine.decode_batch

    def spy(self, tokens, seqs):
        assert len(tokens) == len(seqs)
        calls.append([s.length for s in seqs])
        return decode_batch(self, tokens, seqs)

    monkeypatch.setattr(Engine, "decode_batch", spy)
    (r,) = B.run_bench(
        _params(n_prompt=(0,), n_gen=(8,), n_depth=(3,), n_parallel=(4,), reps=1),
        out=io.StringIO(),
    )
    assert calls == [[3] * 4] + [[3 + k] * 4 for k in range(8)]
    assert r.n_parallel == 4 and r.n_tokens == 32 and r.samples_ns == [10**9]
    assert r.avg_ts == pytest.approx(32.0)  # aggregate: B x tokens / time
    kv = kv_cache_bytes(M.model_facts(TINY).config, 1, torch.float32)
    assert r.kv_bytes_per_step == round(4 * kv * (3 + 4.5))  # positions 4..11 of 4 rows
    steps_per_s = 8.0
    assert r.gbps == pytest.approx((r.bytes_per_token + r.kv_bytes_per_step) * steps_per_s / 1e9)
    assert r.floor_pct == pytest.approx(100 * r.gbps * 1e9 / r.copy_bandwidth)


@pytest.mark.parametrize(
    ("n_parallel", "want"),
    [
        # B = 1: Engine.prefill's forwards (n_batch 8, ubatch 4 -> 4 + 2 tokens)
        (1, [([(0, 4)], "none"), ([(0, 2)], "last")]),
        # B = 3: 18 tokens, sequence after sequence, in calls of 8 and forwards of 4
        (3, [([(0, 4)], "none"), ([(0, 2), (1, 2)], "last"),
             ([(1, 4)], "none"), ([(2, 4)], "last"),
             ([(2, 2)], "last")]),
    ],
)  # fmt: skip
def test_pp_processes_the_prompts_together_in_calls_of_n_batch(
    monkeypatch, fake_clock, n_parallel, want
):
    calls, seqs = [], []
    step = Engine.step

    def spy(self, entries, logits="last"):
        for s, _ in entries:
            if s not in seqs:
                seqs.append(s)
        calls.append(([(seqs.index(s), len(ids)) for s, ids in entries], logits))
        return step(self, entries, logits)

    monkeypatch.setattr(Engine, "step", spy)
    params = _params(
        n_prompt=(6,), n_gen=(0,), n_batch=(8,), n_ubatch=(4,), n_parallel=(n_parallel,),
        reps=1, warmup=False,
    )  # fmt: skip
    (r,) = B.run_bench(params, out=io.StringIO())
    assert calls == want
    assert r.avg_ts == pytest.approx(6.0 * n_parallel) and r.gbps is None


def test_npl_column_and_field_only_where_asked(capsys):
    code = main(["bench", "-m", TINY, "-p", "4", "-n", "2", "-npl", "1,2", "-r", "1",
                 "--device", "cpu", "-q"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    header, _, *rows = [ln for ln in out.splitlines() if ln.startswith("|")]
    names = _cells(header)
    assert names[names.index("threads") + 1 : names.index("t/s")] == ["npl", "test"]
    cells = [dict(zip(names, _cells(r))) for r in rows]
    assert [(c["test"], c["npl"]) for c in cells] == [("pp4", "1"), ("pp4", "2"),
                                                      ("tg2", "1"), ("tg2", "2")]  # fmt: skip
    # -npl 1 (or 1,1) is today's table: no column
    cpu = torch.device("cpu")
    for npl in [(1,), (1, 1)]:
        assert "n_parallel" not in [c.field for c in B.md_columns(_params(n_parallel=npl), cpu)]
    assert main(["bench", "-m", TINY, "-p", "0", "-n", "2", "-npl", "3", "-r", "1",
                 "--device", "cpu", "-q", "-o", "jsonl"]) == 0  # fmt: skip
    (rec,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rec["n_parallel"] == 3 and rec["test"] == "tg2" and rec["kv_bytes_per_step"] > 0
    assert list(rec).index("n_parallel") == list(rec).index("test") + 1


def test_memory_check_counts_a_kv_cache_per_sequence(monkeypatch):
    from kiln import limits

    facts = M.model_facts(TINY)
    one = kv_cache_bytes(facts.config, B.kv_pool_tokens(100, 1), torch.float32)
    monkeypatch.setattr(limits, "free_memory", lambda device: facts.weight_bytes + 2 * one)
    cpu = torch.device("cpu")

    def tests(npl):
        return B.instances(_params(n_prompt=(0,), n_gen=(100,), n_parallel=npl))

    B.check_tests(tests((1, 2)), cpu)  # 1 and 2 sequences of 100 tokens fit
    with pytest.raises(UsageError, match=r"tg100 npl4 .*a KV cache of 4 x 100 tokens.*-npl"):
        B.check_tests(tests((1, 4)), cpu)


def test_kv_pool_tokens_is_the_engines_pool():
    model = B.load_model(TINY, torch.device("cpu"), "auto").model
    for n_ctx, n_seq in [(100, 4), (64, 1), (1, 3)]:
        engine = Engine(model, n_ctx=n_ctx, n_seq=n_seq)
        seqs = [engine.new_sequence() for _ in range(n_seq)]  # held: a dropped one frees
        for seq in seqs:
            engine.reserve(seq, n_ctx)
        assert engine.pool.rows == B.kv_pool_tokens(n_ctx, n_seq)


def test_history_keeps_parallel_sequences_apart(tmp_path):
    from kiln.bench import history as H

    path = tmp_path / "history.jsonl"
    res = B.run_bench(_params(n_prompt=(0,), n_gen=(2,), n_parallel=(1, 2), reps=1), io.StringIO())
    assert H.record_results(res, path, torch.device("cpu")) == 2
    records = H.load_history(path)
    assert [H.record_key(r)[1] for r in records] == ["tg2", "tg2 npl2"]
    # an old record (no n_parallel) is B = 1: it compares with tg2, never with tg2 npl2
    old = {k: v for k, v in records[0].items() if k != "n_parallel"}
    old["commit"] = "0" * 40
    c = H.compare([old, *records], "0" * 40, records[0]["commit"], include_dirty=True)
    rows = {r.key[1]: r for r in c.rows}
    assert rows["tg2"].a is not None and rows["tg2"].b is not None
    assert rows["tg2 npl2"].a is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**records[1], "n_parallel": "2"}) + "\n")
    with pytest.raises(UsageError, match="n_parallel must be an integer"):
        H.load_history(bad)

"""kiln sweep: the sweep-bench method on a tiny synthetic model (CPU), its table, reading
sweep-bench / llama-bench tables back, plots with overlays, and errors without tracebacks."""

from __future__ import annotations

import json
import math
import re

import pytest

from kiln.bench import sweep as S
from kiln.cli import main
from kiln.errors import UsageError

MODEL = "synthetic:tiny-llama:q8_0"

# ik_llama.cpp sweep-bench's stdout, with its log lines around the table
SWEEP_BENCH_MD = """\
llama_new_context_with_model: n_ctx      = 2048

main: n_kv_max = 2048, n_batch = 2048, n_ubatch = 512, flash_attn = 1, n_gpu_layers = 99, \
n_threads = 16, n_threads_batch = 16

|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |
|-------|--------|--------|----------|----------|----------|----------|
|   512 |    128 |      0 |    0.125 |  4096.00 |    1.000 |   128.00 |
|   512 |    128 |    512 |    0.128 |  4000.00 |    1.067 |   120.00 |
|   512 |    128 |   1024 |    0.160 |  3200.00 |    1.164 |   110.00 |
|   512 |    128 |   1536 |    0.200 |  2560.00 |    1.280 |   100.00 |

llama_print_timings:        load time =     812.34 ms
"""

# the same tool with --sweep-memory: two more columns, one of them n/a
SWEEP_BENCH_MEMORY_MD = """\
|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |    RSS HWM | VRAM delta |
|-------|--------|--------|----------|----------|----------|----------|------------|------------|
|   256 |     64 |      0 |    0.500 |   512.00 |    1.000 |    64.00 |     1024.5 |        n/a |
|   256 |     64 |    256 |    0.640 |   400.00 |    1.280 |    50.00 |     1030.0 |        n/a |
"""

LLAMA_BENCH_MD = """\
| model                  |     size | backend | ngl | fa |          test |              t/s |
| ---------------------- | -------: | ------- | --: | -: | ------------: | ---------------: |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  0 |         pp512 |  9000.00 ± 20.00 |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  0 |         tg128 |    150.00 ± 0.20 |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  0 | pp512 @ d1024 |  8000.00 ± 20.00 |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  0 | tg128 @ d1024 |    140.00 ± 0.20 |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  1 |         pp512 |  9500.00 ± 20.00 |
| llama 8B Q4_K - Medium | 4.58 GiB | CUDA    |  99 |  1 |         tg128 |    155.00 ± 0.20 |

build: 1234abcd (5000)
"""


@pytest.fixture(scope="module")
def engine():
    return S.load_engine(MODEL, "cpu", "torch", n_ctx=256, ubatch=64)[0]


class SpyEngine:
    """Forwards to an Engine, recording (op, cache length before, tokens) of each call."""

    def __init__(self, engine):
        self.inner, self.calls = engine, []
        self.ubatch, self.n_ctx = engine.ubatch, engine.n_ctx
        self.config, self.device = engine.config, engine.device

    def new_sequence(self):
        return self.inner.new_sequence()

    def reserve(self, seq, n):
        return self.inner.reserve(seq, n)

    def prefill(self, ids, cache):
        self.calls.append(("pp", cache.length, len(ids)))
        return self.inner.prefill(ids, cache)

    def decode(self, token, cache):
        self.calls.append(("tg", cache.length, 1))
        return self.inner.decode(token, cache)


# -- the plan and the method ----------------------------------------------------------------------
def test_depths_step_by_ubatch_while_a_step_fits():
    assert S.sweep_depths(256, 64, 16) == [0, 64, 128, 192]
    assert S.sweep_depths(300, 64, 16) == [0, 64, 128, 192]  # 256 + 64 > 300
    assert S.sweep_depths(4096, 512, 128) == list(range(0, 4096, 512))  # sweep-bench's 8 rows
    assert S.sweep_depths(64, 64, 16) == [0]
    assert S.sweep_depths(128, 16, 32) == [0, 16, 32, 48, 64, 80, 96]  # TG longer than PP
    assert S.default_n_gen(512) == 128 and S.default_n_gen(2) == 1


@pytest.mark.parametrize(
    ("c", "ub", "n", "says"),
    [
        (32, 64, None, "smaller than the micro-batch -ub 64"),
        (64, 16, 100, "smaller than -n 100"),
        (256, 0, None, "(-ub) must be > 0"),
        (256, -4, None, "(-ub) must be > 0"),
        (256, 64, 0, "(-n) must be > 0"),
        (0, 64, None, "(-c) must be > 0"),
    ],
)
def test_bad_sizes(c, ub, n, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        S.check_sweep_args(c, ub, n)


def test_sweep_fills_the_context_step_by_step(engine):
    spy = SpyEngine(engine)
    cache = engine.new_sequence()
    rows = []
    for row in S.run_sweep(spy, 8, cache=cache, warmup=False):
        # each step leaves its PP in the cache and removes its TG
        assert cache.length == row.n_kv + 64
        rows.append(row)
    assert [r.n_kv for r in rows] == [0, 64, 128, 192]
    assert cache.length == 256  # the context is full
    expected = []
    for n_kv in (0, 64, 128, 192):
        expected += [("tg", n_kv + i, 1) for i in range(8)]  # TG from depth N_KV ...
        expected.append(("pp", n_kv, 64))  # ... removed; PP from the same depth
    assert spy.calls == expected
    for r in rows:
        assert (r.pp, r.tg) == (64, 8)
        assert r.t_pp > 0 and r.t_tg > 0
        assert r.speed_pp == pytest.approx(64 / r.t_pp)
        assert r.speed_tg == pytest.approx(8 / r.t_tg)


def test_warmup_is_untimed_and_leaves_an_empty_cache(engine):
    spy = SpyEngine(engine)
    cache = engine.new_sequence()
    rows = list(S.run_sweep(spy, 4, cache=cache, warmup=True))
    assert spy.calls[:2] == [("pp", 0, 64), ("tg", 64, 1)]  # the warm-up
    assert spy.calls[2] == ("tg", 0, 1)  # the first timed step starts from an empty cache
    assert [r.n_kv for r in rows] == [0, 64, 128, 192]


# -- the table ------------------------------------------------------------------------------------
def test_table_format_matches_sweep_bench():
    assert S.table_header().splitlines() == [
        "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |",
        "|-------|--------|--------|----------|----------|----------|----------|",
    ]
    row = S.SweepRow(512, 128, 1024, 0.1234, 4149.1, 1.5, 85.333)
    assert S.format_row(row) == (
        "|   512 |    128 |   1024 |    0.123 |  4149.10 |    1.500 |    85.33 |"
    )


def test_cli_prints_one_row_per_step(capsys, tmp_path):
    save = tmp_path / "run.jsonl"
    argv = ["sweep", "-m", MODEL, "--device", "cpu", "-c", "128", "-ub", "32", "-n", "4"]
    assert main([*argv, "--save", str(save)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[:2] == S.table_header().splitlines()
    assert len(lines) == 2 + 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:3] for c in cells] == [["32", "4", str(d)] for d in (0, 32, 64, 96)]
    for c in cells:
        assert all(re.fullmatch(r"\d+\.\d{3}", c[i]) for i in (3, 5))
        assert all(re.fullmatch(r"\d+\.\d{2}", c[i]) for i in (4, 6))
    assert "n_kv_max = 128" in out and "n_ubatch = 32" in out
    # the printed table and the saved run read back alike
    printed = S.parse_sweep_table(out)
    (saved,) = S.read_sweeps(save)
    assert [r.n_kv for r in printed] == [r.n_kv for r in saved.rows] == [0, 32, 64, 96]
    for a, b in zip(printed, saved.rows):
        assert a.speed_tg == pytest.approx(b.speed_tg, abs=0.006)


def test_cli_jsonl_has_sweep_bench_keys(capsys):
    argv = ["sweep", "-m", MODEL, "--device", "cpu", "-c", "128", "-ub", "32", "-o", "jsonl"]
    assert main([*argv, "--no-warmup"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["n_kv"] for r in records] == [0, 32, 64, 96]
    keys = {"n_kv_max", "n_batch", "n_ubatch", "pp", "tg", "n_kv", "t_pp", "speed_pp"}
    keys |= {"t_tg", "speed_tg", "model", "device", "backend"}
    assert keys <= set(records[0])
    assert records[0]["tg"] == 8 and records[0]["pp"] == 32 and records[0]["n_kv_max"] == 128


# -- reading tables back --------------------------------------------------------------------------
def test_parse_a_sweep_bench_table():
    rows = S.parse_sweep_table(SWEEP_BENCH_MD, "ik.md")
    assert [r.n_kv for r in rows] == [0, 512, 1024, 1536]
    assert rows[1] == S.SweepRow(512, 128, 512, 0.128, 4000.0, 1.067, 120.0)
    assert [r.speed_tg for r in rows] == [128.0, 120.0, 110.0, 100.0]


def test_parse_a_sweep_bench_table_with_memory_columns():
    (run,) = S.parse_sweeps(SWEEP_BENCH_MEMORY_MD)
    assert [(r.pp, r.tg, r.n_kv, r.speed_pp) for r in run.rows] == [
        (256, 64, 0, 512.0),
        (256, 64, 256, 400.0),
    ]


def test_parse_a_llama_bench_depth_table():
    runs = S.parse_sweeps(LLAMA_BENCH_MD, "lb.md")
    assert [run.name for run in runs] == ["fa=0", "fa=1"]
    fa0 = runs[0].rows
    assert [(r.n_kv, r.pp, r.speed_pp, r.tg, r.speed_tg) for r in fa0] == [
        (0, 512, 9000.0, 128, 150.0),
        (1024, 512, 8000.0, 128, 140.0),
    ]
    assert fa0[0].t_pp == pytest.approx(512 / 9000)


def test_parse_sweep_bench_jsonl_with_log_lines():
    text = "main: loading\n" + "\n".join(
        json.dumps({"n_kv_max": 1024, "n_ubatch": 512, "pp": 512, "tg": 128, "n_kv": k,
                    "t_pp": 0.1, "speed_pp": 5120.0, "t_tg": 1.0, "speed_tg": 128.0})
        for k in (0, 512)
    )  # fmt: skip
    (run,) = S.parse_sweeps(text)
    assert [r.n_kv for r in run.rows] == [0, 512]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("no table here\n", "no sweep found"),
        ("| PP | TG | N_KV | S_PP t/s | S_TG t/s |\n|--|--|--|--|--|\n| 1 | 2 | 3 | x | 5 |\n",
         "S_PP t/s is 'x'"),
        ("| PP | TG | N_KV | S_PP t/s | S_TG t/s |\n|--|--|--|--|--|\n| 1 | 2 | 3 |\n",
         "3 cells, the header has 5"),
        ('{"n_kv": 0, "speed_pp": 1.0\n', "bad JSON line"),
    ],
)  # fmt: skip
def test_unreadable_tables(text, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        S.parse_sweeps(text, "bad.md")


# -- plots ----------------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_a_run_with_overlays(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    md = tmp_path / "ik-sweep.md"
    md.write_text(SWEEP_BENCH_MD)
    lb = tmp_path / "llama-bench.md"
    lb.write_text(LLAMA_BENCH_MD)
    save, png = tmp_path / "fused.jsonl", tmp_path / "out.png"
    argv = ["sweep", "-m", MODEL, "--device", "cpu", "-c", "128", "-ub", "32", "--no-warmup"]
    argv += ["--save", str(save), "--plot", str(png), "--overlay", str(md)]
    argv += ["--overlay", f"llama.cpp={lb}", "--label", "fused", "--title", "test"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().err

    # later: the saved run against the others, no model
    png2 = tmp_path / "only.png"
    argv = ["sweep", "--plot-only", str(png2), str(save), f"ik={md}", "--overlay", str(lb)]
    assert main(argv) == 0
    assert png2.read_bytes()[:8] == PNG_MAGIC and png2.stat().st_size > 10_000
    assert "(4 series)" in capsys.readouterr().err  # llama-bench's fa=0 and fa=1


def test_overlay_labels(tmp_path):
    from kiln.bench import plots

    md = tmp_path / "a.md"
    md.write_text(SWEEP_BENCH_MD)
    lb = tmp_path / "b.md"
    lb.write_text(LLAMA_BENCH_MD)
    series = plots.load_overlays([str(md), f"fusion off={md}", str(lb)])
    assert [s.label for s in series] == ["a", "fusion off", "b fa=0", "b fa=1"]
    assert math.isnan(series[-1].rows[0].speed_pp) is False


# -- errors: one line, exit 1, no traceback -------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["-c", "32", "-ub", "64"], "is smaller than the micro-batch -ub 64"),
        (["-ub", "0"], "(-ub) must be > 0"),
        (["-ub", "-8"], "(-ub) must be > 0"),
        (["-n", "0"], "(-n) must be > 0"),
        (["-m", "no-such-model"], "'no-such-model' is neither a GGUF file"),
        (["-m", "missing/model.gguf"], "missing/model.gguf: no such GGUF file"),
        (["-m", "synthetic:nope:q8_0"], "unknown preset 'nope'"),
        (["-m", "synthetic:tiny-llama"], "bad synthetic model"),
        (["-c", "9999"], "exceeds the 2048 tokens"),
        (["--plot", "x.svg"], "give a file name ending in .png"),
        (["--overlay", "a.md"], "--overlay draws on a plot"),
        (["--plot", "x.png", "--overlay", "missing.md"], "missing.md: no such file"),
        (["leftover.md"], "read only with --plot-only"),
        (["--plot-only", "x.png"], "needs sweep files to plot"),
    ],
)
def test_bad_input_exits_1_with_one_line(capsys, tmp_path, monkeypatch, extra, says):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "-m", MODEL, "--device", "cpu", "-c", "128", "-ub", "32", *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("kiln sweep: error: ")
    assert says in errors[0]
    assert "Traceback" not in err

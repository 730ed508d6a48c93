"""The performance history (kiln.bench.history, `kiln history`, `kiln bench --record`,
scripts/bench_standard.py): record, compare and plot on hand-written history data, the slowdown
and quality rules and the exit status, the plot's default place, revisions resolved by git, the
standard set's flow on the CPU, and bad input. (A kernel slowed on purpose:
test_history_regression.py.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kiln.bench import history as H
from kiln.bench import memory
from kiln.bench import models as M
from kiln.cli import main
from kiln.errors import UsageError
from tests.bench.test_llama_bench import TINY, cached_load_gguf
from tests.conftest import shared_path

C1 = "a1" * 20  # two commits' hashes (40 hex digits)
C2 = "b2" * 20


def rec(commit: str, test: str, samples: list[float], **kw) -> dict:
    p, n, d = {"pp512": (512, 0, 0), "tg128": (0, 128, 0), "tg128 @ d4096": (0, 128, 4096)}[test]
    mean = sum(samples) / len(samples)
    base = {
        "model_filename": "synthetic:qwen3-8b:q4_k_m", "model_type": "qwen3 8B Q4_K - Medium",
        "backends": "torch", "n_batch": 2048, "n_ubatch": 512, "n_prompt": p, "n_gen": n,
        "n_depth": d, "avg_ts": mean, "stddev_ts": 0.0, "samples_ts": samples, "test": test,
        "device_name": "NVIDIA H100 80GB HBM3", "commit": commit, "dirty": False,
        "timestamp": "2026-01-01T00:00:00Z" if commit == C1 else "2026-01-02T00:00:00Z",
    }  # fmt: skip
    return {**base, **kw}


DEMO = "/models/SmolLM2-135M-Instruct-Q4_1.gguf"  # the history names a file by its name


def qrec(commit: str, test: str, **values) -> dict:
    """A quality record of the demo model, as scripts/bench_standard.py writes them."""
    base = {
        "model_filename": DEMO, "backends": "triton", "n_batch": 512, "n_ubatch": 512,
        "test": test, "device_name": "NVIDIA H100 80GB HBM3", "commit": commit, "dirty": False,
        "timestamp": "2026-01-01T00:00:00Z" if commit == C1 else "2026-01-02T00:00:00Z",
    }  # fmt: skip
    return {**base, **values}


def write_history(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def quality_hist(tmp_path):
    """C1 and C2 with the standard set's quality records: C2's PPL rose by less than its
    uncertainty, its KLD rose beyond it (WORSE) and its top-1 agreement rose beyond it
    (BETTER); the ppl test's speed is unchanged."""
    ppl_speed = {"avg_ts": 5000.0, "samples_ts": [4990.0, 5010.0, 5000.0]}
    return write_history(tmp_path / "quality.jsonl", [
        qrec(C1, "ppl c512", ppl=28.60, ppl_err=0.30, **ppl_speed),
        qrec(C1, "kld c512 vs torch", kld=0.0030, kld_err=0.0001, top1=0.960, top1_err=0.005),
        qrec(C2, "ppl c512", ppl=28.70, ppl_err=0.30, **ppl_speed),
        qrec(C2, "kld c512 vs torch", kld=0.0036, kld_err=0.0001, top1=0.975, top1_err=0.005),
    ])  # fmt: skip


@pytest.fixture
def hist(tmp_path):
    """Two commits: tg128 10% slower in C2, pp512 unchanged within the noise, tg128 @ d4096 10%
    faster; plus a dirty C2 run far off, which a comparison leaves out unless asked."""
    records = [
        rec(C1, "pp512", [1000.0, 1010.0, 990.0]),
        rec(C1, "tg128", [100.0, 101.0, 99.0]),
        rec(C1, "tg128 @ d4096", [80.0, 81.0, 79.0]),
        rec(C2, "pp512", [1005.0, 995.0, 1003.0]),
        rec(C2, "tg128", [90.0, 91.0, 89.0]),
        rec(C2, "tg128 @ d4096", [88.0, 89.0, 87.0]),
        rec(C2, "tg128", [500.0, 500.0, 500.0], dirty=True, timestamp="2026-01-03T00:00:00Z"),
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def _table(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()]
    return {r[1]: r for r in rows if len(r) > 2 and r[1] not in ("test",) and r[0][:1] != ":"}


# -- compare --------------------------------------------------------------------------------------
def test_compare_flags_the_slowdown_beyond_the_spread(hist, capsys):
    # a slowdown is a regression: the exit status is 1, for CI and scripts
    assert main(["history", "compare", C1[:8], C2[:8], "--history", str(hist)]) == 1
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert [c.strip() for c in head.strip("|").split("|")][:6] == [
        "model", "test", "device", f"t/s {C1[:8]}", f"t/s {C2[:8]}", "speedup"
    ]  # fmt: skip
    rows = _table(out)
    assert rows["tg128"][3:] == ["100.00 ± 1.00", "90.00 ± 1.00", "0.90", "SLOWER"]
    assert rows["pp512"][-1] == "" and rows["tg128 @ d4096"][-1] == "FASTER"
    assert rows["tg128"][0] == "synthetic:qwen3-8b:q4_k_m"
    assert "1 slowdown(s)" in out and "1 record(s) from dirty trees left out" in out
    assert "quality" not in out  # records without quality values: the speed table alone
    c = H.compare(H.load_history(hist), C1, C2)
    assert c.regressed and [r.key[1] for r in c.regressions] == ["tg128"] and not c.quality
    # without the slowed test nothing is flagged SLOWER: exit 0 (FASTER is no regression)
    argv = ["history", "compare", C1[:8], C2[:8], "--history", str(hist), "--test", "d4096"]
    assert main(argv) == 0
    assert "FASTER" in capsys.readouterr().out


def test_compare_uses_dirty_records_when_asked(hist):
    records = H.load_history(hist)
    c = H.compare(records, C1, C2, include_dirty=True)
    tg = next(r for r in c.rows if r.key[1] == "tg128")
    # the dirty run's 500 t/s pooled in: a mean of 295 with a spread that hides any change
    assert tg.b.n == 6 and tg.b.mean == 295.0 and tg.b.sd > 200 and tg.flag == ""


def test_the_slowdown_rule():
    a = H.Stat(100.0, 2.0, 5, 1)
    assert H.classify(a, H.Stat(95.0, 2.9, 5, 1)) == "SLOWER"  # 97.9 < 98
    assert H.classify(a, H.Stat(95.0, 3.0, 5, 1)) == ""  # 98.0 touches 98: within the spread
    assert H.classify(a, H.Stat(105.0, 2.9, 5, 1)) == "FASTER"
    assert H.classify(a, H.Stat(100.0, 0.0, 5, 1)) == ""


def test_pooled_statistics_without_samples():
    s = H.pooled([{"avg_ts": 10.0, "stddev_ts": 1.0}, {"avg_ts": 12.0, "stddev_ts": 1.0}])
    assert s.mean == 11.0 and s.sd == pytest.approx(2**0.5) and s.runs == 2


def test_revisions_resolve_by_prefix_or_fail_clearly(hist):
    records = H.load_history(hist)
    assert H.resolve_rev("a1a1", records, None) == C1
    with pytest.raises(UsageError, match="names no commit"):
        H.resolve_rev("ffff", records, None)
    two = records + [rec("a1a1" + "0" * 36, "pp512", [1.0])]
    with pytest.raises(UsageError, match="ambiguous"):
        H.resolve_rev("a1a1", two, None)


def _git(repo, *args) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_compare_head_revisions_in_a_git_checkout(tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for message in ("one", "two"):
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
             "--allow-empty", "-m", message)  # fmt: skip
    first, second = _git(repo, "rev-parse", "HEAD~1"), _git(repo, "rev-parse", "HEAD")
    path = repo / "bench" / "history.jsonl"
    path.parent.mkdir()
    lines = [rec(first, "tg128", [100.0, 101.0, 99.0]), rec(second, "tg128", [90.0, 91.0, 89.0])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.chdir(repo)  # the default history file: bench/history.jsonl at the top level
    monkeypatch.delenv(H.ENV_VAR, raising=False)
    assert main(["history", "compare", "HEAD~1", "HEAD"]) == 1  # SLOWER
    out = capsys.readouterr().out
    assert f"t/s HEAD~1 ({first[:7]})" in out and "SLOWER" in out
    assert main(["history", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in listed] == [first[:7], second[:7]]


def test_history_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(H.ENV_VAR, str(tmp_path / "env.jsonl"))
    assert H.history_path(tmp_path / "arg.jsonl") == tmp_path / "arg.jsonl"
    assert H.history_path(None) == tmp_path / "env.jsonl"
    monkeypatch.delenv(H.ENV_VAR)
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.chdir(outside)
    if H.env.git_toplevel() is None:  # tmp is not inside some checkout
        with pytest.raises(UsageError, match="--history PATH"):
            H.history_path(None)


# -- quality --------------------------------------------------------------------------------------
PPL, KLD, TOP1 = H.QUALITY


def test_the_quality_rule():
    """WORSE when the value moved the bad way by more than sqrt(err1^2 + err2^2) (0.5 here),
    BETTER the good way; within it nothing; top-1 is better when higher."""
    a = H.Value(10.0, 0.3, 1)
    assert H.classify_quality(PPL, a, H.Value(10.6, 0.4, 1)) == "WORSE"
    assert H.classify_quality(PPL, a, H.Value(10.5, 0.4, 1)) == ""  # touches: within
    assert H.classify_quality(PPL, a, H.Value(9.4, 0.4, 1)) == "BETTER"
    assert H.classify_quality(KLD, a, H.Value(10.6, 0.4, 1)) == "WORSE"
    assert H.classify_quality(TOP1, a, H.Value(10.6, 0.4, 1)) == "BETTER"
    assert H.classify_quality(TOP1, a, H.Value(9.4, 0.4, 1)) == "WORSE"
    # without uncertainties any move is beyond them
    assert H.classify_quality(KLD, H.Value(1.0, 0.0, 1), H.Value(1.0001, 0.0, 1)) == "WORSE"
    assert H.classify_quality(KLD, H.Value(1.0, 0.0, 1), H.Value(1.0, 0.0, 1)) == ""


def test_quality_of_several_records_is_their_mean():
    records = [{"ppl": 10.0, "ppl_err": 0.2}, {"ppl": 12.0, "ppl_err": 0.4}, {"kld": 0.1}]
    assert H.pooled_value(records, PPL) == H.Value(11.0, pytest.approx(0.3), 2)
    assert H.pooled_value(records, KLD) == H.Value(0.1, 0.0, 1)  # no kld_err: 0
    assert H.pooled_value(records, TOP1) is None


def test_compare_shows_quality_beside_speed_and_fails_on_worse(quality_hist, capsys):
    assert main(["history", "compare", C1[:8], C2[:8], "--history", str(quality_hist)]) == 1
    out = capsys.readouterr().out
    speed, quality = (t for t in out.split("\n\n") if t.startswith("|"))
    speed_rows = _table(speed)
    assert list(speed_rows) == ["ppl c512"] and speed_rows["ppl c512"][-1] == ""
    assert speed_rows["ppl c512"][0] == "SmolLM2-135M-Instruct-Q4_1.gguf"
    head = [c.strip() for c in quality.splitlines()[0].strip("|").split("|")]
    assert head[:7] == ["model", "test", "device", "quality", C1[:8], C2[:8], "change"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in quality.splitlines()[2:]]
    assert [r[1:] for r in rows] == [
        ["ppl c512", "NVIDIA H100 80GB HBM3", "PPL", "28.6000 ± 0.3000", "28.7000 ± 0.3000",
         "+0.1000", ""],
        ["kld c512 vs torch", "NVIDIA H100 80GB HBM3", "KLD", "0.003000 ± 0.000100",
         "0.003600 ± 0.000100", "+0.000600", "WORSE"],
        ["kld c512 vs torch", "NVIDIA H100 80GB HBM3", "top-1", "0.9600 ± 0.0050",
         "0.9750 ± 0.0050", "+0.0150", "BETTER"],
    ]  # fmt: skip
    assert "no slowdown beyond the run-to-run spread" in out
    assert "1 quality regression(s) beyond the uncertainty" in out
    c = H.compare(H.load_history(quality_hist), C1, C2)
    assert c.regressed and not c.slowdowns
    assert [(r.key[1], r.metric.name) for r in c.regressions] == [("kld c512 vs torch", "kld")]


def test_compare_without_a_regression_exits_0(tmp_path, capsys):
    path = write_history(tmp_path / "h.jsonl", [
        qrec(C1, "kld c512 vs torch", kld=0.0030, kld_err=0.0001, top1=0.960, top1_err=0.005),
        qrec(C2, "kld c512 vs torch", kld=0.0020, kld_err=0.0001, top1=0.961, top1_err=0.005),
        qrec(C2, "ppl c512", ppl=28.0, ppl_err=0.3),  # on one side only: shown, not judged
    ])  # fmt: skip
    assert main(["history", "compare", C1[:8], C2[:8], "--history", str(path)]) == 0
    out = capsys.readouterr().out
    assert "t/s" not in out  # quality records only: no speed table
    rows = {(r[1], r[3]): r for r in _rows(out)}
    assert rows[("kld c512 vs torch", "KLD")][-1] == "BETTER"
    assert rows[("kld c512 vs torch", "top-1")][-1] == ""
    assert rows[("ppl c512", "PPL")][4:] == ["-", "28.0000 ± 0.3000", "-", ""]
    assert "no quality regression beyond the uncertainty" in out
    assert not H.compare(H.load_history(path), C1, C2).regressed


def _rows(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()]
    return [r for r in rows if len(r) > 2 and r[0] not in ("model",) and r[0][:1] != ":"]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"kld": "low"}, "kld must be a finite number or null"),
        ({"kld": 0.1, "kld_err": float("nan")}, "kld_err must be a finite number"),
        ({"top1": True}, "top1 must be a finite number"),
        ({"avg_ts": None, "ppl": 3.0}, "avg_ts must be a finite number"),
        ({"test": "x"}, "needs commit and avg_ts (or, for a quality record, ppl, kld or top1)"),
    ],
)
def test_bad_quality_fields_name_the_line(tmp_path, fields, words):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"commit": C1, **fields}) + "\n")
    with pytest.raises(UsageError, match=re.escape(f"{path}:1: not a history record: {words}")):
        H.load_history(path)


def test_a_quality_record_needs_no_speed(tmp_path):
    path = write_history(tmp_path / "h.jsonl", [{"commit": C1, "kld": 0.01, "kld_err": None}])
    (r,) = H.load_history(path)
    assert not H.has_speed(r) and H.has_quality(r) and H.has_quality(r, KLD)
    assert not H.has_quality(r, PPL)
    top1_only = [{"commit": C1, "top1": 0.9}]  # top-1 is compared, not plotted
    with pytest.raises(UsageError, match="nothing to plot"):
        H.plot(top1_only, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


# -- record ---------------------------------------------------------------------------------------
def test_bench_record_appends_one_line_per_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "load_gguf", cached_load_gguf)
    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    path = tmp_path / "sub" / "history.jsonl"
    args = ["bench", "-m", TINY, "-p", "4", "-n", "2", "-r", "2", "--device", "cpu", "-q",
            "--record", "--history", str(path)]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0
    assert "recorded 2 result(s)" in capsys.readouterr().err
    records = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["test"] for r in records] == ["pp4", "tg2", "pp4", "tg2"]
    r = records[1]
    for key in ("commit", "dirty", "device_name", "driver", "torch_version", "triton_version",
                "command", "timestamp", "avg_ts", "samples_ts", "model_filename"):  # fmt: skip
        assert key in r
    assert isinstance(r["dirty"], bool) and r["driver"] == "-" and len(r["samples_ts"]) == 2
    assert r["timestamp"].endswith("Z") and r["model_filename"] == TINY
    # the recorded commit compared with itself: nothing flagged
    loaded = H.load_history(path)
    c = H.compare(loaded, r["commit"], r["commit"], include_dirty=True)
    assert len(c.rows) == 2 and not c.slowdowns


def _bench_standard():
    """scripts/bench_standard.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_standard.py"
    spec = importlib.util.spec_from_file_location("bench_standard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_standard_times_the_perplexity_past_its_first_chunk():
    """The first chunk also compiles: its speed is left out where there are more."""
    S = _bench_standard()
    assert S.chunk_rates((2.0, 0.5, 0.25)) == [S.PPL_CTX / 0.5, S.PPL_CTX / 0.25]
    assert S.chunk_rates((2.0,)) == [S.PPL_CTX / 2.0]


def test_bench_standard_records_speed_and_quality(tmp_path, monkeypatch, capsys, stories_model):
    """The standard set's flow on the CPU, the demo model replaced by stories260K (real, tiny):
    speed records of a tiny model, the PPL record and the KLD record (the cpu backend against
    the torch reference), appended to the history, the plot drawn from it, the KLD base gone
    with its temporary folder; the commit compared with itself flags nothing."""
    from kiln.llm import LLM

    S = _bench_standard()
    monkeypatch.setattr(M, "load_gguf", cached_load_gguf)
    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    monkeypatch.setattr(
        S, "load_demo",
        lambda device, backend, progress: LLM(stories_model, device=str(device), n_ctx=S.PPL_CTX,
                                              backend=backend),
    )  # fmt: skip
    monkeypatch.setattr(S.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    text = tmp_path / "text.txt"
    text.write_bytes(shared_path("data", "wiki.test.raw").read_bytes()[:20_000])
    path, plot = tmp_path / "h" / "history.jsonl", tmp_path / "h" / "history.png"
    argv = ["--device", "cpu", "--models", TINY, "-r", "2", "-p", "8", "-n", "2", "-d", "4",
            "--ppl-file", str(text), "--ppl-chunks", "1", "--record", "--history", str(path),
            "--plot", str(plot)]  # fmt: skip
    assert S.main(argv) == 0
    out, err = capsys.readouterr()
    assert "ppl: stories260K.gguf (cpu)" in out
    assert "kld: stories260K.gguf (cpu) against torch" in out
    assert "kiln bench_standard: ppl cpu: chunk 1/1" in err
    assert "kiln bench_standard: kld cpu vs torch: chunk 1/1" in err
    assert f"5 record(s) appended to {path}; {plot} drawn" in err
    records = H.load_history(path)
    tests = [r["test"] for r in records]
    assert tests == ["pp8", "tg2", "tg2 @ d4", "ppl c512", "kld c512 vs torch"]
    ppl, kld = records[-2:]
    assert ppl["backends"] == kld["backends"] == "cpu" and ppl["avg_ts"] > 0
    assert ppl["samples_ts"] == [ppl["avg_ts"]] and ppl["stddev_ts"] == 0  # one chunk: its own
    assert ppl["ppl"] > 1 and ppl["ppl_err"] > 0 and ppl["ppl_chunks"] == 1
    # stories260K is F32: the cpu backend computes what the reference does, up to rounding
    # (and the base's uint16 log-probs: a KLD a little below 0 is possible)
    assert abs(kld["kld"]) < 1e-3 and kld["kld_err"] >= 0 and kld["top1"] > 0.95
    assert kld["kld_reference"] == "torch" and "avg_ts" not in kld
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    assert list((tmp_path / "tmp").iterdir()) == []  # the base file went with its folder
    commit = records[0]["commit"]
    assert main(["history", "compare", commit, commit, "--dirty", "--history", str(path)]) == 0


def test_bench_standard_refuses_bad_flags_before_any_work(tmp_path, capsys, monkeypatch):
    S = _bench_standard()

    def never(*args):
        raise AssertionError("the benchmarks ran")

    monkeypatch.setattr(S, "bench_models", never)
    path = tmp_path / "h.jsonl"
    for argv, words in (
        (["--history", str(path)], "--history says where --record writes"),
        (["--plot", str(tmp_path / "p.png")], "--plot says where --record writes"),
        (["--record", "--history", str(path), "--plot", str(tmp_path / "p.nope")], ".png"),
        (["--ppl-chunks", "0"], "--ppl-chunks must be >= 1"),
        (["--models", "synthetic:nope:q8_0"], "presets"),
        (["--backend", "nope"], "unknown backend 'nope'"),
    ):
        assert S.main(["--device", "cpu", *argv]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dirty_is_true_exactly_when_the_tree_has_changes(tmp_path, monkeypatch):
    """git_state on a checkout made here: clean after a commit; dirty while a tracked file is
    modified (staged or not) or an untracked file is under kiln/; clean again when the change is
    undone; never dirty for the ignored history file or untracked files outside kiln/."""
    repo = tmp_path / "repo"
    (repo / "kiln").mkdir(parents=True)
    (repo / "kiln" / "a.py").write_text("x = 1\n")
    (repo / "README.md").write_text("readme\n")
    history = repo / H.DEFAULT_RELATIVE
    history.parent.mkdir()
    history.write_text("")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(H.env, "source_dir", lambda: repo / "kiln")

    def dirty() -> bool:
        state = H.env.git_state(ignore=(history,))
        assert state.commit == _git(repo, "rev-parse", "HEAD") and state.number == 1
        return state.dirty

    assert dirty() is False
    history.write_text(json.dumps(rec(C1, "pp512", [1.0])) + "\n")  # every --record does this
    assert dirty() is False
    (repo / "notes.txt").write_text("untracked, outside kiln/\n")
    assert dirty() is False
    (repo / "kiln" / "a.py").write_text("x = 2\n")
    assert dirty() is True
    _git(repo, "add", "kiln/a.py")  # staged
    assert dirty() is True
    _git(repo, "reset", "-q", "--hard")
    assert dirty() is False
    (repo / "README.md").write_text("changed\n")  # a tracked file outside kiln/
    assert dirty() is True
    _git(repo, "checkout", "-q", "--", "README.md")
    assert dirty() is False
    (repo / "kiln" / "new.py").write_text("y = 1\n")  # untracked, inside the code measured
    assert dirty() is True
    (repo / "kiln" / "new.py").unlink()
    (repo / "kiln" / "a.py").unlink()  # deleted
    assert dirty() is True


def test_git_state_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(H.env, "source_dir", lambda: tmp_path / "kiln")
    (tmp_path / "kiln").mkdir()
    if H.env.git_toplevel(tmp_path) is None:  # tmp is not inside some checkout
        assert H.env.git_state() == H.env.GitState("-", False, 0)


# -- plot -----------------------------------------------------------------------------------------
def test_plot_draws_what_it_promises(hist, tmp_path, capsys, monkeypatch):
    """One panel per test (pp first), one line per model + device with a point per commit (the
    dirty run its own point, labelled +): the mean t/s with the sd as error bars; and the PNG
    written is that figure, not blank."""
    from matplotlib.image import imread

    figures = _figures(monkeypatch)
    out = tmp_path / "plots" / "perf.png"
    assert main(["history", "plot", "--history", str(hist), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert len(figures) == 1
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["pp512", "tg128", "tg128 @ d4096"]
    labels = [C1[:7], C2[:7], C2[:7] + "+"]
    # (x, mean, sd) of each point: tg128 at C2 is 10% slower; the dirty run is its own point
    want = {
        "pp512": [(0, 1000.0, 10.0), (1, 1001.0, 28**0.5)],  # sd of 1005, 995, 1003
        "tg128": [(0, 100.0, 1.0), (1, 90.0, 1.0), (2, 500.0, 0.0)],
        "tg128 @ d4096": [(0, 80.0, 1.0), (1, 88.0, 1.0)],
    }
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert ax.get_ylabel() == "t/s"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "synthetic:qwen3-8b:q4_k_m (NVIDIA H100 80GB HBM3)"
        ]
        (bars,) = ax.containers  # one errorbar per model + device
        line, _caps, (ranges,) = bars.lines
        xs, means, sds = zip(*want[ax.get_title()])
        assert list(line.get_xdata()) == list(xs)
        assert list(line.get_ydata()) == pytest.approx(means)
        segments = ranges.get_segments()
        assert [seg[0][0] for seg in segments] == list(xs)
        assert [(seg[1][1] - seg[0][1]) / 2 for seg in segments] == pytest.approx(sds)
    assert axes[-1].get_xlabel().startswith("commit")

    image = imread(out)  # [rows, columns, RGBA] floats in 0..1
    width, height = figures[0].get_size_inches() * figures[0].dpi
    assert image.shape[:2] == (round(height), round(width))
    ink = (image[..., :3] < 0.9).any(-1)  # not white
    assert 0.02 < ink.mean() < 0.5
    blue = (abs(image[..., 0] - 0x1F / 255) < 0.05) & (abs(image[..., 2] - 0xB4 / 255) < 0.05)
    for third in range(3):  # the line (matplotlib's first colour, #1f77b4) in every panel
        rows = slice(third * image.shape[0] // 3, (third + 1) * image.shape[0] // 3)
        assert blue[rows].sum() > 100, f"panel {third + 1} has no line"
    order = H.commit_order(H.load_history(hist))
    assert [H.commit_label(*k) for k in order] == labels


def test_commits_go_in_build_number_order_so_a_backfilled_commit_sits_where_it_belongs():
    """C1 (build 4) measured after C2 (build 5): its records still come first; a commit
    without a build number anywhere puts the order back to the time first recorded."""
    late = "2026-01-03T00:00:00Z"
    old = rec(C1, "tg128", [10.0], build_number=4, timestamp=late)
    quality = qrec(C1, "ppl c512", ppl=28.0, ppl_err=0.3, timestamp=late)  # no build number
    new = rec(C2, "tg128", [11.0], build_number=5)
    assert H.commit_order([new, old, quality]) == [(C1, False), (C2, False)]
    assert H.commit_order([new, {**old, "build_number": 0}]) == [(C2, False), (C1, False)]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figures(monkeypatch) -> list:
    """The figures saved from now on (Figure.savefig kept working)."""
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_plot_draws_quality_beside_speed(quality_hist, tmp_path, monkeypatch):
    """Speed panels first (the ppl test's t/s), then a PPL and a KLD panel whose error bars are
    the records' uncertainties; top-1 is not drawn. A quality-only record is no speed point."""
    figures = _figures(monkeypatch)
    out = H.plot(H.load_history(quality_hist), tmp_path / "q.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["ppl c512", "PPL: ppl c512", "KLD: kld c512 vs torch"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["t/s", "PPL", "KLD"]
    want = {"PPL": ([28.60, 28.70], [0.30, 0.30]), "KLD": ([0.0030, 0.0036], [0.0001, 0.0001])}
    for ax in fig.axes[1:]:
        (bars,) = ax.containers
        line, _caps, (ranges,) = bars.lines
        values, errs = want[ax.get_ylabel()]
        assert list(line.get_xdata()) == [0, 1]
        assert list(line.get_ydata()) == pytest.approx(values)
        halves = [(seg[1][1] - seg[0][1]) / 2 for seg in ranges.get_segments()]
        assert halves == pytest.approx(errs)
        assert [t.get_text() for t in ax.get_xticklabels()] == [C1[:7], C2[:7]]


def test_plot_of_speed_and_quality_from_the_command_line(
    hist, quality_hist, tmp_path, capsys, monkeypatch
):
    """Both histories in one file: every speed test and the two quality panels, one figure,
    each line the same colour in every panel."""
    from matplotlib.colors import to_hex

    figures = _figures(monkeypatch)
    both = write_history(
        tmp_path / "both.jsonl", H.load_history(hist) + H.load_history(quality_hist)
    )
    out = tmp_path / "both.png"
    assert main(["history", "plot", "--history", str(both), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == [
        "pp512", "tg128", "tg128 @ d4096", "ppl c512", "PPL: ppl c512", "KLD: kld c512 vs torch",
    ]  # fmt: skip
    colours: dict[str, set[str]] = {}
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        for label, bars in zip(labels, ax.containers):
            colours.setdefault(label, set()).add(to_hex(bars.lines[0].get_color()))
    assert all(len(c) == 1 for c in colours.values()) and len(colours) == 2
    assert len(set.union(*colours.values())) == 2


def test_plot_goes_to_docs_history_png_of_the_checkout(tmp_path, capsys, hist):
    """Without -o: docs/history.png at the git top level of the history file's checkout; for
    a history outside any checkout, beside it with its name."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    _git(repo, "init", "-q")
    inside = repo / "bench" / "history.jsonl"
    inside.write_bytes(hist.read_bytes())
    assert H.default_plot_path(inside) == repo.resolve() / "docs" / "history.png"
    assert main(["history", "plot", "--history", str(inside)]) == 0
    assert (repo / "docs" / "history.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "docs/history.png" in capsys.readouterr().out
    if H.env.git_toplevel(tmp_path) is None:  # tmp is not inside some checkout
        assert H.default_plot_path(hist) == hist.with_suffix(".png")
        assert main(["history", "plot", "--history", str(hist)]) == 0
        assert hist.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["compare", "ffff", "a1a1"], "names no commit"),
        (["compare", "a1a1", "b2b2", "--test", "pp9999"], "no records of commit"),
        (["plot", "--model", "nothing-like-this"], "no records match"),
        ([], "give an action"),
    ],
)
def test_bad_input_is_one_line_without_traceback(hist, capsys, args, words):
    assert main(["history", *args[:1], "--history", str(hist), *args[1:]] if args else
                ["history"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_history_files(tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert main(["history", "list", "--history", str(missing)]) == 1
    assert "no history at" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec(C1, "pp512", [1.0])) + "\n{not json\n")
    assert main(["history", "list", "--history", str(bad)]) == 1
    assert f"{bad}:2: not a JSON line" in capsys.readouterr().err

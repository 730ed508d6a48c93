"""The performance history (kiln.bench.history, `kiln history`, `kiln bench --record`): record,
compare and plot on hand-written history data, the slowdown rule, revisions resolved by git, and
bad input."""

from __future__ import annotations

import json
import subprocess

import pytest

from kiln.bench import history as H
from kiln.bench import memory
from kiln.bench import models as M
from kiln.cli import main
from kiln.errors import UsageError
from tests.bench.test_llama_bench import TINY, cached_load_gguf

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
    assert main(["history", "compare", C1[:8], C2[:8], "--history", str(hist)]) == 0
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
    assert main(["history", "compare", "HEAD~1", "HEAD"]) == 0
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
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    figures = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
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

"""scripts/load_serve.py (issue 18, item 6): its main() against an in-process `kiln serve` of
stories260K passes with small numbers, and FAILS when the server misbehaves (a cancelled
sequence whose KV blocks are never freed, a stream one token short) or when the results are
wrong, so that its checks cannot pass vacuously."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kiln.runtime import scheduler as sched_mod

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_load_serve", ROOT / "scripts/load_serve.py")
load = importlib.util.module_from_spec(_spec)
sys.modules["_load_serve"] = load  # dataclasses look their module up
_spec.loader.exec_module(load)


def _argv(model, **kw):
    opts = {"requests": 24, "concurrency": 12, "cancel": 0.25, "malformed": 0.2, "settle": 4,
            "max-tokens": 24, "prompt-words": 24, "timeout": 60, "seed": 1}  # fmt: skip
    opts.update(kw)
    argv = ["-m", str(model), "--backend", "torch", "-c", "256", "-np", "4", "-ub", "16"]
    for k, v in opts.items():
        argv += [f"--{k}", str(v)]
    return argv


def test_load_passes_on_the_server(stories_model, capsys):
    assert load.main(_argv(stories_model)) == 0
    out = capsys.readouterr().out
    assert "load: PASS" in out
    # every kind of request took place: completed, cut mid-stream, malformed -> 400
    assert "completed" in out and "cancelled" in out and "malformed -> 400" in out
    assert "KV blocks in use: 0 before" in out and "RSS:" in out


def test_load_fails_when_cancelled_blocks_leak(stories_model, capsys, monkeypatch):
    leaked = []  # held, so that Sequence.__del__ does not give the blocks back

    def leak(self, r):  # a cancelled sequence is dropped without freeing its KV blocks
        if r in self._running:
            self._running.remove(r)
        if r.seq is not None:
            leaked.append(r.seq)
        r.seq, r.next_token = None, None

    monkeypatch.setattr(sched_mod.Scheduler, "_release", leak)
    assert load.main(_argv(stories_model, malformed=0, cancel=0.5, **{"max-tokens": 64})) == 1
    assert leaked
    out = capsys.readouterr().out
    assert "FAIL: KV blocks in use" in out and "load: FAIL" in out


def test_load_fails_when_a_stream_is_a_token_short(stories_model, capsys, monkeypatch):
    real = load.one

    async def short(client, item):  # as if the server had dropped a token of the usage count
        o = await real(client, item)
        if o.completion_tokens:
            o.completion_tokens -= 1
        return o

    monkeypatch.setattr(load, "one", short)
    assert load.main(_argv(stories_model, malformed=0, cancel=0)) == 1
    assert "completion tokens for max_tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "outcome, why",
    [
        (load.Outcome("ok", 8, 200, "length", 7), "wrong length"),
        (load.Outcome("ok", 8, 200, None, None), "wrong length"),
        (load.Outcome("ok", 8, 200, "stop", 3), "finished 'stop'"),
        (load.Outcome("ok", 8, 500, error="boom"), "failed (500)"),
        (load.Outcome("ok", 8, None, error="ReadError"), "failed (None)"),
        (load.Outcome("malformed", 8, 200), "malformed answered wrongly"),
        (load.Outcome("malformed", 8, 400, error_shaped=False), "malformed answered wrongly"),
        (load.Outcome("malformed", 8, 500, error_shaped=True), "malformed answered wrongly"),
    ],
)
def test_evaluate_rejects_fabricated_bad_results(outcome, why):
    good = [load.Outcome("ok", 8, 200, "length", 8), load.Outcome("cancel", 8, 200, cancelled=True),
            load.Outcome("malformed", 8, 422, error_shaped=True)]  # fmt: skip
    counts, failures = load.evaluate(good)
    assert failures == [] and counts == {"completed": 1, "cancelled": 1, "malformed -> 422": 1}
    counts, failures = load.evaluate([*good, outcome])
    assert len(failures) == 1 and counts[why] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "http://10.0.0.1:8080"],
        ["--url", "http://example.com"],
        ["--cancel", "0.7", "--malformed", "0.5"],
        ["--cancel", "-0.1"],
        ["--requests", "0"],
        ["--timeout", "0"],
    ],
)
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        load.parse(argv)
    assert e.value.code == 2


def test_remote_allowed_only_when_asked():
    assert load.parse(["--url", "http://10.0.0.1:8080", "--allow-remote"]).allow_remote
    assert load.parse(["--url", "http://[::1]:8080"]).url == "http://[::1]:8080"

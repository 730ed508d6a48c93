"""scripts/bench_serve.py (issue 18, item 7): against `kiln serve` of stories260K, in-process (-m)
and running (--url), with small numbers: exact token counts, positive rates, ordered
percentiles; a short stream, an unreachable server, refused prompts and a spent --timeout end in
a failure (exit 1) with a message, not a traceback or a table of wrong numbers."""

from __future__ import annotations

import json
import socket
from argparse import Namespace

import pytest

from scripts import bench_serve as bench

SMALL = ["--clients", "1,2", "--prompt-tokens", "8", "--max-tokens", "4"]


@pytest.fixture(scope="module")
def running(stories_model):
    """A kiln server in this process for the --url runs (stories260K: ids 0..511)."""
    args = Namespace(model=str(stories_model), device="cpu", backend="torch", ctx=128,
                     ubatch=16, parallel=2)  # fmt: skip
    srv = bench.L.start_server(args, max_queue=4)
    yield srv.url
    srv.stop()


def check_report(report: dict, clients: list[int], prompt: int, max_tokens: int) -> None:
    assert [lv["clients"] for lv in report["levels"]] == clients and report["failures"] == []
    for lv in report["levels"]:
        k = 3 if lv["clients"] < 8 else 2
        assert lv["requests"] == len(lv["raw"]) == lv["clients"] * k
        assert lv["completion_tokens"] == lv["requests"] * max_tokens
        for r in lv["raw"]:
            assert r["completion_tokens"] == max_tokens and r["prompt_tokens"] == prompt
            assert 0 < r["ttft"] and len(r["itl"]) <= max_tokens - 1
            assert all(x >= 0 for x in r["itl"])
        assert lv["agg_tps"] == pytest.approx(lv["completion_tokens"] / lv["wall_s"])
        assert lv["agg_tps"] > 0 and lv["stream_tps_p50"] > 0
        assert lv["per_client_tps"] == pytest.approx(lv["agg_tps"] / lv["clients"])
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p99"]
        assert 0 <= lv["itl_ms"]["p50"] <= lv["itl_ms"]["p99"]
        assert max_tokens >= lv["tokens_per_chunk"] >= 1


def test_in_process(stories_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["-m", str(stories_model), "--backend", "torch", *SMALL, "--json", str(out)]
    assert bench.main([*argv, "--label", "stories"]) == 0
    report = json.loads(out.read_text())
    check_report(report, [1, 2], 8, 4)
    assert report["token_range"] == [256, 512]  # the upper half of a 512-id vocabulary
    text = capsys.readouterr()
    rows = [line for line in text.out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| clients |") and len(rows) == 3
    one, two = (row.split("|")[1:-1] for row in rows[1:])
    assert one[:2] == [" 1 ", " 3 "] and one[4].strip() == "1.00"
    assert two[:2] == [" 2 ", " 6 "] and float(two[2]) == pytest.approx(
        report["levels"][1]["agg_tps"], abs=0.06
    )
    assert "single-client decode:" in text.out and "stories" in text.out
    assert "2 clients: 6 requests" in text.err  # progress on stderr


def test_running_server(running, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--url", running, "--clients", "2", "--prompt-tokens", "5", "--max-tokens", "3"]
    assert bench.main([*argv, "--token-range", "300:400", "--json", str(out)]) == 0
    check_report(json.loads(out.read_text()), [2], 5, 3)


def test_short_stream_fails(running, capsys, monkeypatch):
    real, calls = bench.L.one, []

    async def short(client, item):  # the warm-up whole, then one token fewer than asked
        o = await real(client, item)
        calls.append(o)
        if len(calls) > 1 and o.completion_tokens:
            o.completion_tokens -= 1
        return o

    monkeypatch.setattr(bench.L, "one", short)
    argv = ["--url", running, *SMALL, "--token-range", "300:400"]
    assert bench.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 clients, request 0: finish_reason 'length', 3 completion tokens" in out
    assert "| 2 |" not in out  # stops at the first level that failed


def test_refused_prompt_is_an_error(running, capsys):
    # ids 1000.. are outside stories260K's 512: the warm-up gets a 400 and the run stops
    assert bench.main(["--url", running, *SMALL]) == 1
    err = capsys.readouterr().err
    assert "the warm-up request failed: request 0: status 400" in err and "--token-range" in err


def test_unreachable_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert bench.main(["--url", f"http://127.0.0.1:{port}", *SMALL]) == 1
    assert "error: cannot reach" in capsys.readouterr().err


def test_timeout(running, capsys):
    assert bench.main(["--url", running, *SMALL, "--timeout", "0.001"]) == 1
    assert "FAIL: 1 clients: not done within --timeout" in capsys.readouterr().out


def test_prompt_ids():
    prompts = [bench.prompt_ids(r, 16, 100, 150) for r in range(2500)]
    assert all(len(p) == 16 and all(100 <= t < 150 for t in p) for p in prompts)
    assert len({tuple(p[:2]) for p in prompts}) == 2500  # no shared prefix: no cache hits
    assert bench.prompt_ids(7, 1, 100, 150) == [107]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--clients", "0"], "client counts must be >= 1"),
        (["--clients", "1,x"], "not a list of integers"),
        (["--token-range", "5:5"], "need 0 <= LO < HI"),
        (["--token-range", "5"], "expected LO:HI"),
        (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--url", "http://10.0.0.1:8080"], "pass --allow-remote"),
    ],
)
def test_bad_flags_are_refused(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err

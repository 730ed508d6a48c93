"""The performance history catches a slowed kernel: a tg test of a tiny synthetic model, measured
on the CPU as `kiln bench` measures it, with one op of the model's op set slowed on purpose
(rms_norm sleeping three times a decode step's time on every call, in addition to its work), is
recorded under a made-up commit beside an unslowed measurement; kiln.bench.history.compare and
`kiln history compare` flag it SLOWER (the command exits with 1). The control: a second unslowed
measurement under a third commit is not flagged SLOWER (exit 0).

Robustness on a shared 2-core machine: the three measurements run in one session (one engine,
KV cache and warm-up) with their repetitions interleaved (A, A', S, A, A', S, ...), so a drift
of the machine reaches all three alike, and each has 10 repetitions. Two identical measurements
are flagged only when their one-sd bands do not touch; with this design none of 300 control
pairs was, with a CPU-bound process running beside them (with 5 repetitions in two sessions,
7 of 300 were). The slowed op's sleep is 3x the step time measured just before (at least 2 ms),
so the slowed test runs at a quarter of the speed or less whatever the machine's load."""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch

from kiln.bench import history as H
from kiln.bench import llama_bench as B
from kiln.bench import memory
from kiln.bench import models as M
from kiln.bench.env import GitState
from kiln.cli import main
from tests.bench.test_llama_bench import TINY, cached_load_gguf

CPU = torch.device("cpu")
TG = B.TestInstance(TINY, 0, 16, 0, B.DEFAULT_N_BATCH[0], B.DEFAULT_N_UBATCH[0])  # tg16
REPS = 10
SLOWED_OP = "rms_norm"  # once per decode step: the first layer's attention norm
BASE, SAME, SLOW = "ba5e" * 10, "5a3e" * 10, "510e" * 10  # made-up commits


@pytest.fixture(scope="module")
def measured() -> dict[str, B.TestResult]:
    """{commit: its tg16 result}: BASE and SAME as the model is, SLOW with rms_norm slowed."""
    mp = pytest.MonkeyPatch()
    mp.setattr(M, "load_gguf", cached_load_gguf)
    mp.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    try:
        runner = B.Runner(CPU, "auto", REPS)
        lm = runner.load(TINY)
        session = runner.session(lm, TG)
        step = statistics.median(session.time_once() for _ in range(3)) / 1e9 / TG.n_gen
        ops = {BASE: lm.model.ops, SAME: lm.model.ops}
        ops[SLOW] = slowed(lm.model.ops, SLOWED_OP, max(2e-3, 3 * step))
        return interleaved(runner, lm, session, ops)
    finally:
        mp.undo()


def slowed(ops, op: str, seconds: float):
    """The op set with `op` sleeping `seconds` before its work on every call."""
    work = getattr(ops, op)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return work(*args, **kwargs)

    return dataclasses.replace(ops, **{op: slow})


def interleaved(runner: B.Runner, lm: B.LoadedModel, session, ops: dict) -> dict:
    """One TestResult per key of `ops`, their repetitions taken in turn in one session, the
    model running that key's op set."""
    results = {key: runner.new_result(lm, TG) for key in ops}
    original = lm.model.ops
    try:
        for _ in range(REPS):
            for key, op_set in ops.items():
                lm.model.ops = op_set
                results[key].samples_ns.append(session.time_once())
    finally:
        lm.model.ops = original
    return results


@pytest.fixture
def history_file(tmp_path, measured):
    """The three results as history records of their made-up commits."""
    path = tmp_path / "history.jsonl"
    records = [
        H.make_record(r.fields(samples=True), GitState(commit, False, 1), CPU, "test")
        for commit, r in measured.items()
    ]
    assert H.append_records(path, records) == 3
    return path


def test_the_slowed_op_is_flagged_slower(history_file, measured, capsys):
    base, slow = measured[BASE], measured[SLOW]
    assert slow.avg_ts < base.avg_ts / 2, "the slowed op did not slow the test"
    c = H.compare(H.load_history(history_file), BASE, SLOW)
    (row,) = c.rows
    assert row.key[1] == "tg16" and row.flag == "SLOWER" and c.regressed
    assert c.regressions == [row] and not c.quality
    argv = ["history", "compare", BASE[:10], SLOW[:10], "--history", str(history_file)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "1 slowdown(s) beyond the run-to-run spread" in out


def test_an_unchanged_run_is_not_flagged_slower(history_file, capsys):
    c = H.compare(H.load_history(history_file), BASE, SAME)
    (row,) = c.rows
    assert row.flag != "SLOWER" and not c.regressed, (row.a, row.b)
    argv = ["history", "compare", BASE[:10], SAME[:10], "--history", str(history_file)]
    assert main(argv) == 0
    assert "no slowdown beyond the run-to-run spread" in capsys.readouterr().out

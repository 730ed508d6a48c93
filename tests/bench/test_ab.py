"""`kiln ab` (kiln.bench.ab): the verdict on fixed numbers, configuration strings, the
interleaved run with its output check on a tiny synthetic model, and bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kiln.bench import ab as AB
from kiln.bench import memory
from kiln.bench import models as M
from kiln.cli import main
from kiln.errors import UsageError
from tests.bench.test_llama_bench import TINY, cached_load_gguf


@pytest.fixture(autouse=True)
def fast_bench(monkeypatch):
    monkeypatch.setattr(M, "load_gguf", cached_load_gguf)
    monkeypatch.setattr(AB, "load_gguf", cached_load_gguf)
    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    monkeypatch.setattr(memory, "COPY_REPS", 2)


# -- the verdict ----------------------------------------------------------------------------------
def test_a_consistent_gain_is_a_win():
    a = [100.0, 102.0, 98.0, 101.0, 99.0]
    b = [105.0, 107.5, 102.5, 106.0, 104.0]  # +5% every round
    v = AB.verdict(a, b)
    assert v.kind == "win" and v.ratio == pytest.approx(1.05, abs=2e-3)
    assert v.t > AB.t_critical(4) and str(v).startswith("win: B +5.0%")


def test_a_consistent_loss_is_a_loss():
    v = AB.verdict([50.0, 51.0, 49.0], [45.0, 45.8, 44.2])
    assert v.kind == "loss" and v.ratio < 1 and v.t < -AB.t_critical(2)


def test_a_change_within_the_spread_is_no_difference():
    # the B/A ratios scatter around 1 (1.04, 0.95, 1.03, 0.98): no verdict either way
    v = AB.verdict([100.0, 100.0, 100.0, 100.0], [104.0, 95.0, 103.0, 98.0])
    assert v.kind == "no significant difference"
    assert abs(v.t) < AB.t_critical(3) and str(v).startswith("no significant difference")


def test_same_mean_gain_with_more_spread_is_not_significant():
    tight = AB.verdict([100.0] * 4, [103.0, 103.5, 102.5, 103.0])
    loose = AB.verdict([100.0] * 4, [110.0, 96.0, 109.0, 97.0])  # also +3% on average
    assert tight.kind == "win" and loose.kind == "no significant difference"
    assert tight.ratio == pytest.approx(loose.ratio, abs=0.005)


def test_the_verdict_is_symmetric_in_a_and_b():
    a, b = [100.0, 98.0, 103.0, 99.0], [104.0, 101.0, 108.0, 103.0]
    ab, ba = AB.verdict(a, b), AB.verdict(b, a)
    assert ab.t == pytest.approx(-ba.t) and ab.ratio == pytest.approx(1 / ba.ratio)
    assert (ab.kind, ba.kind) == ("win", "loss")


def test_identical_runs_and_too_few_rounds():
    assert AB.verdict([10.0, 10.0], [10.0, 10.0]).kind == "no significant difference"
    exact = AB.verdict([10.0, 20.0], [11.0, 22.0])  # exactly +10% both rounds: no spread at all
    assert exact.kind == "win" and math.isinf(exact.t)
    assert AB.verdict([10.0], [12.0]).kind == "too few rounds"
    with pytest.raises(ValueError):
        AB.verdict([1.0, 2.0], [1.0])


def test_t_critical_values():
    assert AB.t_critical(1) == 12.706 and AB.t_critical(4) == 2.776 and AB.t_critical(30) == 2.042
    assert AB.t_critical(1000) == 1.96 and math.isinf(AB.t_critical(0))


# -- configurations -------------------------------------------------------------------------------
def test_configuration_strings():
    c = AB.parse_config("-ub 32 -b 64 KILN_SWIGLU=0 --backend torch", "A")
    assert (c.n_ubatch, c.n_batch, c.backend, c.env) == (32, 64, "torch", (("KILN_SWIGLU", "0"),))
    assert AB.parse_config("", "B") == AB.Config("B", "")
    assert AB.parse_config(f"-m {TINY}", "B").model == TINY
    assert AB.parse_config("--fusion swiglu=0", "B").fusions == (("swiglu", False),)
    for bad, words in [
        ("-p 64", "the tests (-p, -n, -pg, -d)"),
        ("-r 3", "given once"),
        ("--bogus 1", "not a configuration flag"),
        ("--fusion swiglu=2", "NAME=0"),
        ("--fusion nope=1", "unknown fusion"),
        ("-ub 0", ">= 1"),
        ("-ub 32,64", "one value"),
        ("-m synthetic:nope:q8_0", "presets"),
        ("'unclosed", "configuration A"),
    ]:
        with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            AB.parse_config(bad, "A")


def test_environment_is_applied_and_restored(monkeypatch):
    monkeypatch.setenv("KILN_AB_TEST_KEEP", "1")
    monkeypatch.delenv("KILN_AB_TEST_NEW", raising=False)
    with AB.applied_env([("KILN_AB_TEST_KEEP", "0"), ("KILN_AB_TEST_NEW", "x")]):
        assert os.environ["KILN_AB_TEST_KEEP"] == "0" and os.environ["KILN_AB_TEST_NEW"] == "x"
    assert os.environ["KILN_AB_TEST_KEEP"] == "1" and "KILN_AB_TEST_NEW" not in os.environ


# -- a run ----------------------------------------------------------------------------------------
def test_ab_runs_interleaved_and_checks_greedy_outputs(capsys):
    code = main(["ab", "-m", TINY, "-p", "8", "-n", "4", "-r", "2", "--device", "cpu",
                 "--check-tokens", "8", "-ub 4", "-ub 8"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "2 rounds of A then B" in out and "A: -ub 4" in out and "B: -ub 8" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert [c.strip() for c in rows[0].strip("|").split("|")] == [
        "test", "A t/s", "B t/s", "B/A", "verdict"
    ]  # fmt: skip
    assert rows[2].startswith("| pp8 ") and rows[3].startswith("| tg4 ")
    assert " ± " in rows[2] and "n = 2" in rows[2]
    # the micro-batch size does not change the arithmetic of these ops: same greedy tokens
    assert "greedy outputs over 8 tokens: identical" in out


def test_run_ab_records_one_sample_per_round():
    params = AB.ABParams(
        model=TINY, a=AB.parse_config("", "A"), b=AB.parse_config("-b 4", "B"),
        n_prompt=(8,), n_gen=(0,), rounds=3, device="cpu", check_tokens=4,
    )  # fmt: skip
    res = AB.run_ab(params)
    (row,) = res.rows
    assert row.test == "pp8" and len(row.a) == len(row.b) == 3 and min(row.a + row.b) > 0
    assert res.outputs_identical is True and len(res.tokens["A"]) == 4


def test_ab_of_a_fusion_on_and_off(capsys):
    """A fusion toggle as a configuration: the merged Q/K/V weights on (defaults) and off; the
    merge keeps each output's arithmetic, so the greedy outputs are identical."""
    code = main(["ab", "-m", TINY, "-p", "0", "-n", "4", "-r", "2", "--device", "cpu",
                 "--check-tokens", "8", "--a", "", "--b", "--fusion merged_qkv=0"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "B: --fusion merged_qkv=0" in out and "| tg4 " in out
    assert "greedy outputs over 8 tokens: identical" in out


def test_report_names_the_first_differing_token():
    params = AB.ABParams(model=TINY, a=AB.Config("A", "X=0"), b=AB.Config("B", "X=1"))
    row = AB.ABRow("tg4", a=[10.0, 10.5], b=[10.2, 10.4])
    res = AB.ABResult(params, torch.device("cpu"), {"A": TINY, "B": TINY}, [row],
                      {"A": [1, 2, 3, 4], "B": [1, 2, 9, 4]})  # fmt: skip
    text = AB.format_report(res)
    assert "DIFFER from token 2 (A 3, B 9)" in text and "| tg4 " in text


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["-ub 4"], "give two configurations"),
        (["-ub 4", "-ub 8", "-ub 16"], "more than two"),
        (["-r", "0", "-ub 4", "-ub 8"], "must be >= 1"),
        (["-ub 4", "-ub 8 -n 4"], "given once"),
        (["-m", f"{TINY},{TINY}", "-ub 4", "-ub 8"], "one model"),
        (["-m", "nothing.gguf", "", "-ub 8"], "nothing.gguf: no such GGUF file"),
        (["--check-tokens", "-1", "", "-ub 8"], "--check-tokens"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, flags, words):
    assert main(["ab", "--device", "cpu", "-n", "2", "-p", "0", *flags]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

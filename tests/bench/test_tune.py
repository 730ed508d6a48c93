"""`kiln tune`: the decision rule (flip only on a win on every model, outputs passing), which
fusions it tunes here, the device file it writes and `kiln fusions` printing its evidence, and
one real run on the CPU (a trial: nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.bench import ab as AB
from kiln.bench import tune as T
from kiln.cli import main
from kiln.commands import fusions as F
from kiln.errors import UsageError
from kiln.fusion import FUSIONS, FusionPolicy

CPU = torch.device("cpu")
STEADY = [100.0, 101.0, 99.0, 100.5, 100.2]
FASTER = [x * 1.2 for x in STEADY]
SAME = [x * r for x, r in zip(STEADY, (1.01, 0.99, 1.0, 0.995, 1.005))]  # no significant change


def _trial(model: str, b_tg: list[float], outputs_pass: bool = True) -> T.ModelTrial:
    rows = (AB.ABRow("pp512", STEADY, SAME), AB.ABRow("tg128", STEADY, b_tg))
    return T.ModelTrial(model, rows, "greedy 128 tokens identical", outputs_pass)


def test_a_default_flips_only_on_a_win_on_every_model() -> None:
    wins = [_trial("a", FASTER), _trial("b", FASTER)]
    d = T.decide("pdl", wins)
    assert d.flipped and d.on is (not FUSIONS["pdl"].builtin)
    # one model without a significant win, one whose outputs fail, one that loses: builtin kept
    for other, why in (
        (_trial("b", SAME), "b: no significant difference at n = 5 (more rounds may decide)"),
        (_trial("b", FASTER, False), "b: its outputs fail the check"),
        (_trial("b", [x / 1.2 for x in STEADY]), "b: a loss at tg128"),
    ):
        d = T.decide("pdl", [wins[0], other])
        assert not d.flipped and d.on is FUSIONS["pdl"].builtin
        assert d.shortfall() == why  # said in the report and the evidence
        assert f"B did not win on every model ({why})" in d.evidence("H100 80GB HBM3")
    assert not T.decide("pdl", []).flipped
    text = T.decide("qkv_norm_rope", wins).evidence("H100 80GB HBM3")
    assert "off (builtin on): B won on every model" in text
    assert (
        "-m a pp512 " in text
        and "tg128 100.14 -> 120.17 t/s (B/A 1.200 +- 0.000, win, n = 5)" in text
    )


def test_which_fusions_are_tuned_here() -> None:
    tuned = {n for n, f in FUSIONS.items() if f.tuned}
    assert tuned == {"qkv_norm_rope", "prompt_graphs", "norm_quant", "pdl"}
    # on the CPU with the torch backend pdl, prompt_graphs (CUDA) and norm_quant (triton) cannot run
    assert T.tunable(None, CPU, "torch") == ["qkv_norm_rope"]
    with pytest.raises(UsageError, match="no device-dependent default"):
        T.tunable(["swiglu"], CPU, "torch")
    with pytest.raises(UsageError, match="cannot be tuned here: n/a"):
        T.tunable(["pdl"], CPU, "torch")


def test_the_device_file_keeps_other_entries_and_kiln_fusions_shows_the_evidence(
    tmp_path, monkeypatch, capsys
) -> None:
    path = tmp_path / "fusions,device=Test_GPU.json"
    path.write_text(json.dumps({"swiglu": {"on": True, "evidence": "by hand"}}))
    gpu = {"name": "NVIDIA Test GPU", "sms": 132, "driver": "580.0"}
    decision = T.decide("pdl", [_trial("a", FASTER)])
    T.write_device_file([decision], gpu, path)
    data = json.loads(path.read_text())
    assert data["swiglu"] == {"on": True, "evidence": "by hand"}
    assert data["device"] == gpu
    assert data["pdl"]["on"] is True and data["pdl"]["evidence"].startswith("Test GPU, ")
    assert data["pdl"]["measured"][0]["tests"]["tg128"]["b_ts"] == FASTER
    assert T.earlier_trials(path, "swiglu") == []  # recorded by hand: no trials kept

    # a later run measures another model only: the decision counts the file's trial of "a" too,
    # and a new trial of "a" replaces the old one
    later = T.decide("pdl", [_trial("b", SAME)])
    assert not later.flipped
    both = T.with_earlier(later, T.earlier_trials(path, "pdl"))
    assert [t.model for t in both.trials] == ["a", "b"] and not both.flipped
    again = T.with_earlier(
        T.decide("pdl", [_trial("a", FASTER), _trial("b", FASTER)]), T.earlier_trials(path, "pdl")
    )
    assert [t.model for t in again.trials] == ["a", "b"] and again.flipped
    T.write_device_file([both], gpu, path)
    kept = json.loads(path.read_text())["pdl"]
    assert kept["on"] is False and [m["model"] for m in kept["measured"]] == ["a", "b"]
    assert T.ModelTrial.from_record(kept["measured"][0]).rows[1].verdict.kind == "win"
    data = json.loads(path.read_text())

    entries = {n: e for n, e in data.items() if n in FUSIONS}
    monkeypatch.setattr("kiln.fusion.device_entries", lambda device: entries)
    policy = FusionPolicy(
        {n: False for n in FUSIONS},
        {n: "device default" if n == "pdl" else "builtin" for n in FUSIONS},
    )
    text = F.format_evidence(policy, CPU)
    assert text.startswith("evidence of the device defaults:")
    assert "pdl: Test GPU, " in text and "swiglu" not in text


def test_a_trial_run_on_the_cpu(capsys, monkeypatch) -> None:
    """A real interleaved A/B of qkv_norm_rope on a tiny model with the torch backend, on small
    tests (pp32, tg8, 16 tokens checked) to keep CI short; nothing to write on a CPU (--write
    refused)."""
    for name, value in (("N_PROMPT", 32), ("N_GEN", 8), ("CHECK_TOKENS", 16)):
        monkeypatch.setattr(T, name, value)
    argv = ["tune", "--device", "cpu", "--backend", "torch", "-m", "synthetic:tiny-llama:q8_0"]
    assert main([*argv, "--rounds", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "qkv_norm_rope: -m synthetic:tiny-llama:q8_0 pp32 " in out and "; tg8 " in out
    assert "greedy 16 tokens identical" in out and "nothing written" in out
    assert main([*argv, "--write"]) != 0
    assert "--write needs a CUDA device" in capsys.readouterr().err
    assert main(["tune", "--device", "cpu"]) != 0
    assert "give -m MODEL for a trial run" in capsys.readouterr().err

"""kiln.bench.env.gpu_state: what nvidia-smi says of the GPU's clock, power and heat, parsed; a
field it cannot read left out; None where it cannot say (the CPU, no nvidia-smi)."""

from __future__ import annotations

import torch

from kiln.bench import env


def test_gpu_state_parses_nvidia_smi(monkeypatch):
    asked = []

    def output(cmd, cwd=None):
        asked.append(cmd)
        return "1980, 1980, 512.31, 61\n"

    monkeypatch.setattr(env, "_output", output)
    state = env.gpu_state(torch.device("cuda", 1))
    assert state == {"sm_mhz": 1980, "sm_max_mhz": 1980, "power_w": 512.31, "temp_c": 61}
    assert "--id=1" in asked[0] and "--format=csv,noheader,nounits" in asked[0]


def test_gpu_state_leaves_out_what_it_cannot_read(monkeypatch):
    monkeypatch.setattr(env, "_output", lambda cmd, cwd=None: "1755, 1980, [N/A], 44")
    assert env.gpu_state(torch.device("cuda", 0)) == {
        "sm_mhz": 1755,
        "sm_max_mhz": 1980,
        "temp_c": 44,
    }
    monkeypatch.setattr(env, "_output", lambda cmd, cwd=None: "[N/A], [N/A], [N/A], [N/A]")
    assert env.gpu_state(torch.device("cuda", 0)) is None


def test_gpu_state_is_none_without_a_gpu_or_nvidia_smi(monkeypatch):
    assert env.gpu_state(torch.device("cpu")) is None
    monkeypatch.setattr(env, "_output", lambda cmd, cwd=None: None)
    assert env.gpu_state(torch.device("cuda", 0)) is None

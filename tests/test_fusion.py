"""The fusion registry: strict toggles, their precedence, `--fusion` parsing, `kiln fusions`,
and bench's fusion sweep (the fused-against-unfused results are in tests/models/test_fusions.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from kiln import fusion as F
from kiln.cli import main
from kiln.errors import ConfigError, UsageError


def test_builtin_defaults_and_sources_on_a_cpu():
    policy = F.FusionPolicy.resolve("cpu", "torch", env={})
    assert set(policy.states) == set(F.FUSIONS)
    for name, f in F.FUSIONS.items():
        if f.needs_gpu_backend or f.needs_triton:  # cuda_graphs, pdl; norm_quant
            assert not policy.states[name] and policy.sources[name].startswith("n/a")
        else:
            assert policy.states[name] == f.builtin and policy.sources[name] == "builtin"
    assert policy.describe() == "default"


def test_norm_quant_needs_the_triton_backend_not_a_gpu():
    """norm_quant runs wherever the triton backend does (Triton's interpreter too); asked for
    on another backend it is off, with the reason."""
    on = F.FusionPolicy.resolve("cpu", "triton", {"norm_quant": True}, env={})
    assert on.norm_quant and on.sources["norm_quant"] == "cli"
    off = F.FusionPolicy.resolve("cpu", "cpu", {"norm_quant": True}, env={})
    assert not off.norm_quant and "triton" in off.sources["norm_quant"]
    assert F.FUSIONS["norm_quant"].approximate and not F.FUSIONS["swiglu"].approximate


def test_command_line_beats_environment_beats_builtin():
    env = {"KILN_SWIGLU": "0", "KILN_QK_NORM": "0"}
    policy = F.FusionPolicy.resolve("cpu", "torch", {"qk_norm": True}, env=env)
    assert (policy.swiglu, policy.sources["swiglu"]) == (False, "env")
    assert (policy.qk_norm, policy.sources["qk_norm"]) == (True, "cli")
    assert policy.describe() == "qk_norm=1,swiglu=0"


@pytest.mark.parametrize("value", ["", "yes", "true", "2", " 1", "on"])
def test_environment_values_are_strict(value):
    with pytest.raises(ConfigError, match=r"KILN_SWIGLU=.* set it to 0 \(off\) or 1 \(on\)"):
        F.FusionPolicy.resolve("cpu", "torch", env={"KILN_SWIGLU": value})


def test_cuda_graphs_needs_the_triton_backend_on_cuda():
    policy = F.FusionPolicy.resolve("cpu", "triton", {"cuda_graphs": True}, env={})
    assert (
        not policy.cuda_graphs
        and "needs the triton backend on CUDA" in policy.sources["cuda_graphs"]
    )


def test_measured_device_defaults_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    path = F.device_defaults_path("NVIDIA H100 80GB HBM3")
    assert path.name == "fusions,device=NVIDIA_H100_80GB_HBM3.json"
    entries = {"swiglu": False, "pdl": True}
    path.write_text(
        json.dumps({n: {"on": on, "evidence": "kiln ab ..."} for n, on in entries.items()})
    )
    policy = F.FusionPolicy.resolve("cuda", "triton", env={})
    assert (policy.swiglu, policy.sources["swiglu"]) == (False, "device default")
    assert (policy.pdl, policy.sources["pdl"]) == (True, "device default")
    assert F.FusionPolicy.resolve("cuda", "triton", env={"KILN_SWIGLU": "1"}).swiglu


@pytest.mark.parametrize(
    "path", sorted(F.CONFIG_DIR.glob("fusions,device=*.json")), ids=lambda p: p.stem
)
def test_shipped_device_files_are_what_kiln_tune_writes(path, monkeypatch):
    """Each committed fusion file names its GPU (the file is that GPU's), holds entries of known
    fusions with a state, its evidence and the measured trials, and is read back as that GPU's
    device defaults."""
    data = json.loads(path.read_text())
    device = data.pop("device")
    assert {"name", "sms", "driver"} <= set(device), device
    assert F.device_defaults_path(device["name"]) == path
    assert data and set(data) <= set(F.FUSIONS), sorted(data)
    for name, entry in data.items():
        assert isinstance(entry["on"], bool), name
        assert entry["evidence"].startswith(device["name"].removeprefix("NVIDIA ")), name
        assert entry["measured"], name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: device["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    policy = F.FusionPolicy.resolve("cuda", "triton", env={})
    for name, entry in data.items():
        assert (getattr(policy, name), policy.sources[name]) == (entry["on"], "device default")


def test_pdl_needs_hopper(monkeypatch):
    """Programmatic dependent launch is off before compute capability 9.0, whatever was asked."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    policy = F.FusionPolicy.resolve("cuda", "triton", {"pdl": True}, env={})
    assert not policy.pdl
    assert policy.sources["pdl"] == "n/a: needs compute capability 9.0 (here 8.0)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    policy = F.FusionPolicy.resolve("cuda", "triton", {"pdl": True}, env={})
    assert (policy.pdl, policy.sources["pdl"]) == (True, "cli")


def test_pdl_launch_is_off_in_the_interpreter(monkeypatch):
    from kiln.kernels import pdl_launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl_launch(True) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pdl_launch(True) == {"PDL": True, "launch_pdl": True}
    assert pdl_launch(False) == {"PDL": False, "launch_pdl": False}


def test_overrides_and_sweeps_parse():
    assert F.parse_overrides(["swiglu=0", "qk-norm=1"]) == {"swiglu": False, "qk_norm": True}
    assert F.parse_overrides(["swiglu=0,qk_norm=1"]) == {"swiglu": False, "qk_norm": True}
    assert F.parse_overrides(None) == {}
    assert F.parse_sweep(["swiglu=1,0", "qk_norm=0"]) == [
        {"swiglu": True, "qk_norm": False},
        {"swiglu": False, "qk_norm": False},
    ]
    for bad, words in [
        ("swiglu", "NAME=0"),
        ("swiglu=2", "NAME=0"),
        ("nope=1", "unknown fusion 'nope'"),
        ("0,swiglu=1", "NAME=0"),
    ]:
        with pytest.raises(UsageError, match=words):
            F.parse_overrides([bad])
    with pytest.raises(UsageError, match="sweep for kiln bench"):
        F.parse_overrides(["swiglu=0,1"])


def test_kiln_fusions_lists_every_fusion(capsys, monkeypatch):
    monkeypatch.setenv("KILN_SWIGLU", "0")
    assert main(["fusions", "--device", "cpu", "--fusion", "qk_norm=0"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("fusion ")) + 1
    end = next(i for i, ln in enumerate(lines) if ln.startswith("Set one with"))
    rows = {ln.split()[0]: ln.split()[1:3] for ln in lines[start:end] if ln.split()}
    assert rows["swiglu"] == ["off", "env"] and rows["qk_norm"] == ["off", "cli"]
    assert rows["merged_qkv"] == ["on", "builtin"]
    assert all(name in out for name in F.FUSIONS)
    # then what runs each op, decided once for the op set: the fusions that are off run their
    # decomposition
    ops = {ln.split()[0]: ln.split(None, 1)[1] for ln in lines[end + 2 :]}
    from kiln.ops import OP_NAMES

    assert sorted(ops) == sorted(OP_NAMES)
    assert ops["swiglu"].startswith("unfused") and ops["qk_norm"].startswith("unfused")
    assert not ops["add_rms_norm"].startswith("unfused")


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["fusions", "--fusion", "bogus=1"], {}, "unknown fusion 'bogus'"),
        (["fusions"], {"KILN_QKV_NORM_ROPE": "yes"}, "KILN_QKV_NORM_ROPE='yes' is not allowed"),
        (["run", "-p", "hi", "--fusion", "swiglu=0,1"], {}, "sweep for kiln bench"),
        (["fusions", "--backend", "tpu"], {}, "unknown backend 'tpu'"),
    ],
)
def test_bad_fusion_input_is_one_line(capsys, monkeypatch, args, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main([*args, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_triton_backend_without_a_gpu_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "kiln", "fusions", "--device", "cpu", "--backend", "triton"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "the triton backend runs on a CUDA GPU" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_sweeps_fusions_with_a_fusion_column(monkeypatch):
    from kiln.bench import llama_bench as B
    from kiln.bench import memory

    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    sweep = tuple(tuple(c.items()) for c in F.parse_sweep(["merged_qkv=1,0"]))
    params = B.BenchParams(
        models=("synthetic:tiny-llama:q8_0",), n_prompt=(0,), n_gen=(2,), reps=1,
        device="cpu", backend="torch", fusions=sweep, output="md",
    )  # fmt: skip
    out = io.StringIO()
    results = B.run_bench(params, out=out)
    assert [r.inst.fusion_label for r in results] == ["merged_qkv=1", "merged_qkv=0"]
    header, _, *rows = [ln for ln in out.getvalue().splitlines() if ln.startswith("|")]
    cells = [c.strip() for c in header.strip("|").split("|")]
    col = cells.index("fusion")
    assert [[c.strip() for c in r.strip("|").split("|")][col] for r in rows] == [
        "merged_qkv=1",
        "merged_qkv=0",
    ]
    assert results[0].fields()["fusions"] == "merged_qkv=1"

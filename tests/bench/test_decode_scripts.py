"""scripts/kernels_per_token.py, scripts/profile_decode.py and scripts/profile_prompt.py: they
measure on a GPU only, but import, parse their flags and drive the engine (Engine.step of B
sequences, cut back to the same step) on the CPU too, so a runtime change that breaks them fails
here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kiln.models import build_model
from tests.bench.test_llama_bench import cached_load_gguf

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_model():
    gguf, _ = cached_load_gguf("synthetic:tiny-qwen3:q8_0", torch.device("cpu"))
    return build_model(gguf, torch.device("cpu"))


@pytest.mark.parametrize("name", ["kernels_per_token", "profile_decode"])
def test_script_parses_its_flags(name, capsys):
    script = _script(name)
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--help"])
    assert e.value.code == 0 and "--batch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", "m", "--batch", "0"])
    assert e.value.code == 2 and "--batch must be >= 1" in capsys.readouterr().err
    assert script.parse_args(["--model", "m"]).batch == 1  # B = 1 by default
    if not torch.cuda.is_available():
        assert script.main(["--model", "m"]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_kernels_per_token_runs_a_step_of_b_sequences(cpu_model):
    script = _script("kernels_per_token")
    assert script.count_kernels(cpu_model, 3) == 0  # the CPU launches no CUDA kernel
    assert script.is_upload("Memcpy HtoD (Pageable -> Device)")
    assert not script.is_upload("_matvec_kernel") and not script.is_upload("Memset (Device)")


def test_profile_decode_profiles_the_same_step_each_time(cpu_model):
    script = _script("profile_decode")
    # n_ctx 65: the step decodes position 64, the first of a new KV block
    engine, seqs = script.filled_engine(cpu_model, 65, 2)
    assert [s.length for s in seqs] == [64, 64]
    assert script.kernel_times(engine, seqs) == []  # no CUDA kernel on the CPU
    assert [s.length for s in seqs] == [64, 64]  # cut back: the profiled step is repeatable
    assert script.graph_us(engine, seqs) is None  # no CUDA graphs on the CPU
    # -ctk / -ctv: the pool of the cache type asked for
    engine, _ = script.filled_engine(cpu_model, 9, 1, "q8_0", "f16")
    assert engine.pool.k[0].type.name == "q8_0" and engine.pool.v[0].dtype == torch.float16
    assert script.parse_args(["--model", "m", "-ctk", "q4_0"]).cache_type_k == "q4_0"


def test_profile_prompt_times_the_same_chunk_at_its_depth(cpu_model, capsys):
    script = _script("profile_prompt")
    args = script.parse_args(["--model", "m"])
    assert (args.prompt, args.depth, args.repeats) == (512, 0, 10)
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", "m", "-p", "1"])
    assert e.value.code == 2 and "-p must be >= 2" in capsys.readouterr().err
    step, seq = script.prompt_step(cpu_model, 9, 20)
    assert seq.length == 20
    walls = script.wall_ms(step, 2)
    assert len(walls) == 2 and all(w > 0 for w in walls) and seq.length == 29  # cut back each time
    assert script.launched(step, torch.device("cpu")) == []  # no CUDA kernel on the CPU
    if not torch.cuda.is_available():
        assert script.main(["--model", "m"]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err

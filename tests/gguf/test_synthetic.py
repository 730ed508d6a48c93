"""Synthetic models: presets, in-memory builds, files that read back byte for byte and that
llama.cpp loads, and a forward pass that stays finite."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType, GGUFValueType

from kiln.cli import main
from kiln.errors import UsageError
from kiln.gguf import read_gguf
from kiln.gguf import synthetic as syn
from kiln.gguf.synthetic import PRESETS, build_model, make_model_file, preset_config
from kiln.gguf.writer import write_gguf
from tests.conftest import shared_path, synthetic_model
from tests.peer import llama_perplexity

Q = GGMLQuantizationType
TINY = [name for name in PRESETS if name.startswith("tiny-")]
TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_k_m"]


def tiny(preset: str, mix: str):
    """Each tiny model is built once per test session (K-quants cost seconds on 2 cores), shared
    with the other tests (tests/conftest.py)."""
    return synthetic_model(preset, mix)


# --------------------------------------------------------------------------------------------
# presets


# Parameter counts of the Hugging Face checkpoints (tied embeddings counted once).
HF_PARAMS = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248 + 64,  # and the 64 rope_freqs factors GGUF stores as a tensor
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen2.5-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name", list(HF_PARAMS))
def test_real_presets_have_the_checkpoints_parameter_count(name):
    shapes = preset_config(PRESETS[name]).expected_tensors().values()
    assert sum(math.prod(s) for s in shapes) == HF_PARAMS[name]


def test_real_preset_shapes():
    llama = preset_config(PRESETS["llama3-8b"])
    assert (llama.n_layer, llama.n_embd, llama.n_head, llama.n_head_kv, llama.head_dim) == (
        32, 4096, 32, 8, 128,
    )  # fmt: skip
    assert (llama.n_ff, llama.n_vocab, llama.rope_base, llama.tied_output) == (
        14336, 128256, 500000.0, False,
    )  # fmt: skip
    llama31 = preset_config(PRESETS["llama3.1-8b"])
    assert dataclasses.replace(llama31, n_ctx_train=8192, has_rope_freqs=False) == llama
    assert llama31.n_ctx_train == 131072 and llama31.has_rope_freqs
    small = preset_config(PRESETS["qwen3-0.6b"])
    assert small.head_dim * small.n_head != small.n_embd and small.tied_output
    moe = preset_config(PRESETS["qwen3-30b-a3b"])
    assert (moe.n_expert, moe.n_expert_used, moe.n_ff_expert, moe.n_head_kv) == (128, 8, 768, 4)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_allow_k_quants(name):
    for shape in preset_config(PRESETS[name]).expected_tensors().values():
        assert len(shape) == 1 or shape[-1] % 256 == 0, shape


def test_tiny_qwen3_head_size_differs_from_embd_over_heads():
    p = PRESETS["tiny-qwen3"]
    assert p.head_dim * p.n_head != p.n_embd


def test_unknown_preset_and_bad_layers():
    with pytest.raises(UsageError, match="unknown preset 'nope'.*tiny-llama"):
        build_model("nope", "f32")
    with pytest.raises(UsageError, match="--layers must be at least 1"):
        build_model("tiny-llama", "f32", layers=0)


# --------------------------------------------------------------------------------------------
# in memory and on disk


@pytest.mark.parametrize("name", TINY)
def test_in_memory_build_has_a_valid_config(name):
    model = tiny(name, "f32")
    assert model.path is None and model.source == "<in-memory model>"
    config = model.config
    p = PRESETS[name]
    assert (config.arch, config.n_layer, config.n_embd, config.head_dim) == (
        p.arch, p.n_layer, p.n_embd, p.head_dim,
    )  # fmt: skip
    assert (config.n_vocab, config.tied_output, config.n_expert) == (
        p.n_vocab, p.tied_output, p.n_expert,
    )  # fmt: skip
    assert all(t.data.dtype == torch.uint8 for t in model.tensors.values())


@pytest.mark.parametrize("mix", TYPES)
@pytest.mark.parametrize("name", TINY)
def test_tiny_round_trip(name, mix, tmp_path):
    model = tiny(name, mix)
    path = tmp_path / f"{name}-{mix}.gguf"
    write_gguf(model, path, progress=False)
    back = read_gguf(path)
    assert back.config == _unnamed(model.config, back.config.name)
    assert back.metadata == model.metadata
    for key, types in model.metadata_types.items():
        assert back.metadata_types[key] == types, key
    assert list(back.tensors) == list(model.tensors)
    for tname, t in model.tensors.items():
        b = back.tensors[tname]
        assert (b.qtype, b.shape) == (t.qtype, t.shape), tname
        assert torch.equal(b.data, t.data), tname
    assert path.stat().st_size < 10_000_000  # a few MB at most
    if mix not in ("f32", "f16"):
        assert path.stat().st_size < 3_000_000


def _unnamed(config, name):
    from dataclasses import replace

    return replace(config, name=name)


def test_metadata_llama_cpp_needs(tmp_path):
    model = tiny("tiny-qwen3moe", "q8_0")
    meta, types = model.metadata, model.metadata_types
    a = "qwen3moe"
    for key in ["block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "rope.dimension_count", "vocab_size", "expert_count",
                "expert_used_count", "expert_feed_forward_length"]:  # fmt: skip
        assert types[f"{a}.{key}"] == [GGUFValueType.UINT32], key
    for key in ["attention.layer_norm_rms_epsilon", "rope.freq_base"]:
        assert types[f"{a}.{key}"] == [GGUFValueType.FLOAT32], key
    assert meta["general.file_type"] == 7 and meta["general.quantization_version"] == 2
    assert types["tokenizer.ggml.token_type"] == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert types["tokenizer.ggml.bos_token_id"] == [GGUFValueType.UINT32]
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == PRESETS["tiny-qwen3moe"].n_vocab == meta[f"{a}.vocab_size"]
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[meta["tokenizer.ggml.bos_token_id"]] == "<|endoftext|>"
    assert tokens[-1].startswith("<|extra_") and "<|im_start|>" in meta["tokenizer.chat_template"]


def test_file_has_the_same_bytes_as_the_in_memory_build(tmp_path):
    path = make_model_file("tiny-qwen2", "q8_0", tmp_path / "m.gguf", progress=False, seed=3)
    on_disk = read_gguf(path)
    in_memory = build_model("tiny-qwen2", "q8_0", seed=3)
    for name, t in in_memory.tensors.items():
        assert torch.equal(on_disk.tensors[name].data, t.data), name
    other_seed = build_model("tiny-qwen2", "q8_0", seed=4)
    name = "blk.0.attn_q.weight"
    assert not torch.equal(other_seed.tensors[name].data, in_memory.tensors[name].data)


def test_layers_override():
    model = build_model("tiny-llama", "f16", layers=3)
    assert model.config.n_layer == 3 and "blk.2.ffn_down.weight" in model.tensors


def test_weights_follow_the_documented_scales():
    model = tiny("tiny-llama", "f32")
    q = model.tensors["blk.0.attn_q.weight"].dequantize()
    down = model.tensors["blk.0.ffn_down.weight"].dequantize()
    assert q.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert down.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)
    assert torch.equal(model.tensors["output_norm.weight"].dequantize(), torch.ones(256))


def test_big_tensors_are_sampled_from_a_pool_of_real_blocks(monkeypatch):
    monkeypatch.setattr(syn, "DIRECT_MAX_CHUNKS", 16)
    monkeypatch.setattr(syn, "POOL_CHUNKS", 64)
    model = build_model("tiny-llama", "q4_0")
    t = model.tensors["blk.0.ffn_gate.weight"]  # [512, 256]: 512 chunks of 256 values
    chunks = t.data.reshape(-1, 8 * 18)  # 8 Q4_0 blocks of 18 bytes per chunk
    assert 32 < len(torch.unique(chunks, dim=0)) <= 64
    values = t.dequantize()
    assert values.std().item() == pytest.approx(1 / 16, rel=0.1)


# --------------------------------------------------------------------------------------------
# a forward pass: activations stay finite and bounded through every layer


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _forward(model, tokens):
    """A plain float32 forward pass without RoPE; returns (final hidden state, logits)."""
    c = model.config
    w = {name: t.dequantize() for name, t in model.tensors.items()}
    x = w["token_embd.weight"][tokens]  # [T, n_embd]
    n_tok = len(tokens)
    mask = torch.full((n_tok, n_tok), float("-inf")).triu(1)
    for i in range(c.n_layer):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], c.rms_eps)
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T + w.get(p + f"attn_{n}.bias", 0) for n in "qkv")
        q = q.view(n_tok, c.n_head, c.head_dim)
        k = k.view(n_tok, c.n_head_kv, c.head_dim)
        v = v.view(n_tok, c.n_head_kv, c.head_dim)
        if c.spec.qk_norm:
            q = _rms_norm(q, w[p + "attn_q_norm.weight"], c.rms_eps)
            k = _rms_norm(k, w[p + "attn_k_norm.weight"], c.rms_eps)
        rep = c.n_head // c.n_head_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n_tok, -1)
        x = x + attn @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], c.rms_eps)
        x = x + (_moe(w, p, h, c) if c.moe else _ffn(w[p + "ffn_gate.weight"],
                                                         w[p + "ffn_up.weight"],
                                                         w[p + "ffn_down.weight"], h))  # fmt: skip
        assert torch.isfinite(x).all(), f"layer {i}"
    out = w.get("output.weight", w["token_embd.weight"])
    return x, _rms_norm(x, w["output_norm.weight"], c.rms_eps) @ out.T


def _ffn(gate, up, down, h):
    return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T


def _moe(w, p, h, c):
    probs = (h @ w[p + "ffn_gate_inp.weight"].T).softmax(-1)
    top, idx = probs.topk(c.n_expert_used, -1)
    top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for weight, e in zip(top[t], idx[t]):
            gate, up = w[p + "ffn_gate_exps.weight"][e], w[p + "ffn_up_exps.weight"][e]
            out[t] += weight * _ffn(gate, up, w[p + "ffn_down_exps.weight"][e], h[t : t + 1])[0]
    return out


@pytest.mark.parametrize("mix", ["f16", "q4_k_m"])
@pytest.mark.parametrize("name", TINY)
def test_activations_stay_finite_and_bounded(name, mix):
    model = tiny(name, mix)
    tokens = torch.tensor([300, 1, 42, 7, 255, 123])
    x, logits = _forward(model, tokens)
    assert torch.isfinite(logits).all()
    assert x.abs().max() < 100  # residual RMS grows ~sqrt(layers) from ~1/16
    assert 0.3 < logits.std().item() < 3  # logits ~N(0, 1): a flat but not degenerate output


def test_activations_stay_finite_through_many_layers():
    model = build_model("tiny-qwen3", "f16", layers=12)
    x, logits = _forward(model, torch.tensor([5, 6, 7]))
    assert torch.isfinite(logits).all() and x.abs().max() < 100


# --------------------------------------------------------------------------------------------
# vocabularies


@functools.cache
def spm_vocab_model():
    """tiny-llama with llama.cpp's SentencePiece test vocabulary (32000 tokens): its embeddings
    are big enough to be sampled from pools."""
    return build_model(
        "tiny-llama", "q8_0", vocab=shared_path("vocab", "ggml-vocab-llama-spm.gguf")
    )


def test_vocab_copies_the_tokenizer(tmp_path):
    vocab = read_gguf(shared_path("vocab", "ggml-vocab-llama-spm.gguf"))
    model = spm_vocab_model()
    tok_keys = {k for k in vocab.metadata if k.startswith("tokenizer.")}
    for key in tok_keys:
        assert model.metadata[key] == vocab.metadata[key], key
        assert model.metadata_types[key] == vocab.metadata_types[key], key
    assert model.config.n_vocab == 32000 == model.metadata["llama.vocab_size"]
    assert model.tensors["token_embd.weight"].shape == (32000, 256)
    std = model.tensors["output.weight"].dequantize().std().item()
    assert std == pytest.approx(1 / 16, rel=0.05)
    path = tmp_path / "spm.gguf"
    write_gguf(model, path, progress=False)
    assert read_gguf(path).metadata["tokenizer.ggml.model"] == "llama"


def test_vocab_without_tokens_is_refused(tmp_path):
    no_vocab = tiny("tiny-llama", "f32")
    stripped = type(no_vocab)(
        {k: v for k, v in no_vocab.metadata.items() if not k.startswith("tokenizer.")},
        {},
        {},
    )
    with pytest.raises(UsageError, match="no tokenizer.ggml.tokens"):
        build_model("tiny-llama", "f32", vocab=stripped)


# --------------------------------------------------------------------------------------------
# the command


def test_make_model_command(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    argv = ["make-model", "--preset", "tiny-qwen3", "--type", "q8_0", "-o", str(out)]
    assert main(argv + ["--seed", "5", "--layers", "1", "--quiet"]) == 0
    model = read_gguf(out)
    assert model.config.n_layer == 1 and model.metadata["general.file_type"] == 7
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "nope", "--type", "q8_0"], "unknown preset 'nope'"),
        (["--preset", "tiny-llama", "--type", "q9_9"], "unknown quantization type 'q9_9'.*q4_k_m"),
        (["--preset", "tiny-llama", "--type", "f16", "--layers", "0"], "at least 1"),
        (["--preset", "tiny-llama", "--type", "f16", "--vocab", "/no/such.gguf"], "no such file"),
    ],
)
def test_make_model_command_errors(tmp_path, capsys, extra, message):
    assert main(["make-model", "-o", str(tmp_path / "x.gguf"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln make-model: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "x.gguf").exists()


# --------------------------------------------------------------------------------------------
# llama.cpp loads and runs what make-model writes


def test_llama_cpp_runs_every_tiny_file_and_a_copied_vocab(peer_cpu: Path, tmp_path):
    models = {f"{n}-q4_k_m": tiny(n, "q4_k_m") for n in TINY}
    models["tiny-qwen2-f16"] = tiny("tiny-qwen2", "f16")
    models["tiny-llama-spm"] = spm_vocab_model()
    args = []
    for name, model in models.items():
        write_gguf(model, tmp_path / f"{name}.gguf", progress=False)
        args += ["-m", str(tmp_path / f"{name}.gguf")]
    run = subprocess.run(
        [str(peer_cpu), "llama-bench", *args, "-p", "16", "-n", "4", "-r", "1", "-t", "2",
         "-o", "csv"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.count(",") > 5][1:]
    assert len(rows) == 2 * len(models)  # a pp16 and a tg4 row for each file


def test_llama_cpp_perplexity_is_finite(peer_cpu: Path, tmp_path):
    text = shared_path("data", "wiki.test.raw").read_bytes()[:20000]
    (tmp_path / "wiki.txt").write_bytes(text)
    path = tmp_path / "m.gguf"
    write_gguf(tiny("tiny-qwen3", "q4_k_m"), path, progress=False)
    out = llama_perplexity(
        peer_cpu, "-m", path, "-f", tmp_path / "wiki.txt", "-c", 128, "--chunks", 2
    )
    found = re.findall(r"\[\d+\]([0-9.]+|nan|inf)", out)  # per chunk: "[1]650.80,[2]632.40,"
    assert len(found) == 2, out[-3000:]
    # Random logits ~N(0, 1) over 320 tokens: about 320 * e^0.5 = 528.
    assert all(100 < float(ppl) < 3000 for ppl in found), found

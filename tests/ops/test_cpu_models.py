"""Whole models on the cpu backend against the torch reference: tiny synthetic models of every
architecture (two layers, 64 wide), the real stories260K, and the KLD gate on a model in the demo
model's formats (Q4_1 layers, Q8_0 tied embedding).

Random tiny models have flat distributions with near ties (top-1/top-2 gaps of 0.001 in logits
of magnitude 4), which any rounding may flip, so greedy decoding is checked as in
tests/models/hf_reference.py: one teacher-forced pass of the reference over the cpu backend's
greedy continuation must find each chosen token the reference's argmax, or within MARGIN of it.
MARGIN = 0.25: the measured worst logit error of the packed formats on these models is 0.09; a
wrong kernel moves logits by about their range (1-4).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from kiln.bench.perplexity import kld_token_values
from kiln.gguf.synthetic import PRESETS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.ops import cpu_pack
from kiln.runtime.engine import Engine

MARGIN = 0.25
PROMPT = [1, 17, 42, 99, 7, 23, 5, 64, 200, 3, 77, 150, 9, 61, 12, 250, 33, 4, 101]
STEPS = 12

# one per architecture feature: tied Q8_0 embedding + Q4_1 (the demo's formats), llama 3 RoPE
# factors, QKV bias, Q/K norm with neox RoPE, routed experts
MODELS = [
    ("tiny-llama", "q4_1"),
    ("tiny-llama3", "q8_0"),
    ("tiny-qwen2", "q4_0"),
    ("tiny-qwen3", "q5_1"),
    ("tiny-qwen3moe", "q8_0"),
]


@functools.cache
def micro(name: str, qtype: str, tied: bool | None = None):
    """A two-layer, 64-wide variant of a tiny preset (built in about a second)."""
    preset = dataclasses.replace(
        PRESETS[name], name=f"micro-{name}", n_layer=2, n_embd=64, n_head=2, n_head_kv=1,
        head_dim=32, n_ff=96, n_ff_expert=32,
    )  # fmt: skip
    if tied is not None:
        preset = dataclasses.replace(preset, tied_output=tied)
    return synthetic(preset, qtype)


def _logits(model, ids: list[int]) -> torch.Tensor:
    engine = Engine(model, n_ctx=64, ubatch=8)  # prompt chunks after others: offset attention
    return engine.prefill(ids, engine.new_sequence(), all_logits=True)


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    engine = Engine(model, n_ctx=64, ubatch=8)
    cache = engine.new_sequence()
    logits = engine.prefill(prompt, cache)
    out = []
    for _ in range(steps):
        out.append(int(logits[-1].argmax()))
        logits = engine.decode(out[-1], cache)
    return out


def _greedy_disagreements(ref_model, prompt, continuation, margin):
    """Steps where the reference, fed the same tokens, ranks the chosen token more than
    `margin` below its own argmax."""
    logits = _logits(ref_model, prompt + continuation[:-1])[len(prompt) - 1 :]
    chosen = logits.gather(1, torch.tensor(continuation)[:, None]).squeeze(1)
    short = logits.max(dim=1).values - chosen
    return [(i, round(float(s), 4)) for i, s in enumerate(short) if s > margin]


@pytest.mark.parametrize(("name", "qtype"), MODELS, ids=lambda v: str(v))
def test_tiny_models_decode_greedily_as_the_reference(name, qtype):
    gguf = micro(name, qtype)
    model = build_model(gguf, "cpu", backend="cpu")
    ref = build_model(gguf, "cpu", backend="torch")
    tokens = _greedy(model, PROMPT, STEPS)
    assert _greedy_disagreements(ref, PROMPT, tokens, MARGIN) == []
    # and the teacher-forced logits of prompt + continuation, prompt path (chunks of 8)
    ids = PROMPT + tokens
    ours, base = _logits(model, ids), _logits(ref, ids)
    kld = kld_token_values(ours, torch.log_softmax(base.double(), -1), ids[1:] + [0]).kld
    assert (ours - base).abs().max() < MARGIN
    assert kld.mean() < 1e-3, f"mean KLD {kld.mean():.3g}"


def test_kld_gate_on_the_demo_models_formats():
    """The quality gate of the issue (mean KLD < 2e-3, top-1 >= 99% against the float32
    reference), in the demo model's formats on a tiny model: measured mean KLD 6e-5. Top-1 is
    counted where the reference's top two differ by more than MARGIN (near ties of a random
    model flip on any rounding, see the module docstring)."""
    gguf = micro("tiny-llama", "q4_1", tied=True)
    assert gguf.tensors["token_embd.weight"].qtype.name == "Q8_0"
    assert "output.weight" not in gguf.tensors
    kinds = {t.qtype.name for t in gguf.tensors.values() if len(t.shape) == 2}
    assert kinds == {"Q4_1", "Q8_0"}
    ids = PROMPT + list(range(30, 75))
    ours = _logits(build_model(gguf, "cpu", backend="cpu"), ids)
    base = _logits(build_model(gguf, "cpu", backend="torch"), ids)
    values = kld_token_values(ours, torch.log_softmax(base.double(), -1), ids[1:] + [0])
    assert values.kld.mean() < 5e-4, f"mean KLD {values.kld.mean():.3g}"
    top2 = base.topk(2, dim=1).values
    decisive = torch.from_numpy(values.same_top)[(top2[:, 0] - top2[:, 1]) > MARGIN]
    assert decisive.numel() > len(ids) // 4 and bool(decisive.all())


def test_float32_models_are_the_reference(stories_model):
    """F32 weights run the reference's own float32 matmuls; attention, RoPE and norms differ only
    in operation order: the same greedy tokens, logits within 1e-5 of their magnitude."""
    from kiln.gguf import read_gguf

    gguf = read_gguf(stories_model)
    model = build_model(gguf, "cpu", backend="cpu")
    ref = build_model(gguf, "cpu", backend="torch")
    prompt = [1, 403, 154, 263, 93, 298]
    tokens = _greedy(model, prompt, 32)
    assert tokens == _greedy(ref, prompt, 32)
    ids = prompt + tokens
    ours, base = _logits(model, ids), _logits(ref, ids)
    assert (ours - base).abs().max() <= 1e-5 * (1 + base.abs().max())


@pytest.mark.parametrize("tied", [True, False])
def test_no_float32_copy_of_quantized_weights(tied):
    """Every quantized matrix keeps its packed form only (Q4_1 as one int4 plane: its own size
    of 0.625 bytes a value; Q8_0 as two: 1.25 against its 1.0625), also after running; an
    untied token embedding keeps only its blocks (it is read a row at a time)."""
    gguf = micro("tiny-llama", "q4_1", tied=tied)
    model = build_model(gguf, "cpu", backend="cpu")
    _logits(model, PROMPT)
    embd = model.w["token_embd.weight"]
    assert embd._dense is None and (embd.packed is None) == (not tied)
    for name, w in model.w.items():
        if w.qtype.name in ("Q4_1", "Q8_0") and len(w.shape) == 2 and w.packed is not None:
            assert w._dense is None, name
            forms = w.packed.forms if isinstance(w.packed, cpu_pack.Concat) else [w.packed]
            assert all(isinstance(f, cpu_pack.Int4Planes) for f in forms), name
            for f in forms:  # 4 + 1 bits a value a plane (nibble, 2 bf16 per 32), rows padded
                rows = -(-f.n // 64) * 64
                assert f.nbytes == len(f.planes) * rows * f.k * 5 // 8, name
    assert model.merged_qkv == 2 and model.merged_gate_up == 2
    assert all(model.w[f"blk.{i}.attn_qkv.weight"].raw is None for i in range(2))

"""Every fusion against its unfused form, on the triton backend (kernels; Triton's interpreter
without a GPU) for tiny synthetic models of each architecture, and on the demo model on a GPU.

- greedy tokens identical with the fusion on and off (128 steps on a GPU; in the interpreter,
  where a decode step of even a one-layer model takes about 2 s, 3 steps of one-layer "micro"
  qwen3 and qwen3moe models: every fusion applies to one of them);
- logits bitwise equal where the fusion runs the same arithmetic: CUDA-graph replay, programmatic
  dependent launch (on an H100);
- the others within the kernel tolerance. The merged weights compute each output row with the
  same code, and are bitwise equal in the interpreter, but Triton specializes a kernel on its
  sizes (N divisible by 16 or not), and on an H100 that compiled variant differed in the last
  bits of tiny-llama's logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.fusion import FUSIONS
from kiln.gguf.synthetic import PRESETS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.runtime.engine import Engine

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
STEPS = 128 if CUDA else 3
if CUDA:
    MODELS = [("tiny-llama", "q8_0"), ("tiny-qwen2", "q4_0"), ("tiny-qwen3", "q4_k_m"),
              ("tiny-qwen3moe", "q8_0"), ("tiny-qwen3moe", "q4_k_m")]  # fmt: skip
else:
    MODELS = [("tiny-qwen3", "q8_0"), ("tiny-qwen3moe", "q8_0")]
# Fed in micro-batches of UBATCH = matvec.MAX_M tokens: a chunk of 8 (flash attention, the
# batched mat-vec) and one of 1. Not the GEMM: its bf16 rounding of the activations turns a
# fusion's last-bit differences into 2^-9-sized ones (qkv_norm_rope=0 moved tiny-qwen3's logits
# by 3.9e-3 on an H200) and flips near-ties of these random models. The GEMM's prompt path is
# gated by KL divergence on the demo model (tests/test_cuda_decode.py) and by its kernel tests.
PROMPT = [1, 17, 42, 99, 7, 23, 5, 64, 200]
UBATCH = 8


def preset(name: str):
    """The tiny preset on a GPU; on the CPU a one-layer, 64-wide variant of it."""
    if CUDA:
        return name
    return dataclasses.replace(
        PRESETS[name], name=f"micro-{name}", n_layer=1, n_embd=64, n_head=2, n_head_kv=1,
        head_dim=32, n_ff=64, n_ff_expert=32,
    )  # fmt: skip


# Fusions whose fused and unfused forms give the same bits (see the docstring).
BITWISE = {"cuda_graphs", "pdl"} | ({"merged_qkv", "merged_gate_up"} if not CUDA else set())
# The exact fusions (approximate ones, norm_quant, have their KLD gate: test_norm_quant.py).
SWITCHABLE = [
    n for n, f in FUSIONS.items() if (not f.needs_gpu_backend or CUDA) and not f.approximate
]


def greedy(model, steps: int = STEPS, prompt: list[int] = PROMPT):
    """(tokens, logits [steps, n_vocab]) of greedy decoding after a prompt."""
    engine = Engine(model, n_ctx=len(prompt) + steps + 1, ubatch=UBATCH)
    cache = engine.new_sequence()
    logits = engine.prefill(prompt, cache)[-1]
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits.float().cpu().clone())
        token = int(torch.argmax(logits))
        tokens.append(token)
        logits = engine.decode(token, cache)[-1]
    return tokens, torch.stack(rows)


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}")
def tiny(request):
    name, qtype = request.param
    return synthetic(preset(name), qtype, device=DEVICE)


@pytest.fixture(scope="module")
def all_on(tiny):
    fused = {n: True for n in SWITCHABLE}
    return greedy(build_model(tiny, DEVICE, backend="triton", fusions=fused))


@pytest.mark.parametrize("name", SWITCHABLE)
def test_fusion_off_gives_the_same_tokens(tiny, all_on, name):
    fused = {n: n != name for n in SWITCHABLE}
    model = build_model(tiny, DEVICE, backend="triton", fusions=fused)
    tokens, logits = greedy(model)
    ref_tokens, ref_logits = all_on
    assert tokens == ref_tokens, f"{name}=0 changes the greedy tokens"
    if name in BITWISE:
        assert torch.equal(logits, ref_logits), f"{name}=0 changes the logits' bits"
    else:
        scale = 1 + ref_logits.abs().amax(-1, keepdim=True)
        err = ((logits - ref_logits).abs() / scale).max().item()
        assert err < 1e-4, f"{name}=0: logits differ by {err:.2e} (relative to 1 + max|logit|)"


def test_all_fusions_off_matches_the_reference_backend(tiny, all_on):
    """The fused kernels against the torch reference ops (float32 KV cache, dense weights)."""
    ref = build_model(tiny, DEVICE, backend="torch", fusions={n: False for n in FUSIONS})
    tokens, logits = greedy(ref)
    assert tokens == all_on[0]
    scale = 1 + logits.abs().amax(-1, keepdim=True)
    err = ((all_on[1] - logits).abs() / scale).max().item()
    # the f16 KV cache, and flash attention's f16 operands for the prompt chunk
    assert err < 3e-3, f"triton vs torch reference: {err:.2e}"


def test_merged_weights_apply_where_types_match(tiny):
    model = build_model(tiny, DEVICE, backend="torch")
    c = model.config
    assert model.merged_qkv + sum(f"blk.{i}.attn_q.weight" in model.w for i in range(c.n_layer))
    assert model.merged_qkv == c.n_layer or any(
        model.w[f"blk.{i}.attn_v.weight"].qtype != model.w[f"blk.{i}.attn_q.weight"].qtype
        for i in range(c.n_layer)
        if f"blk.{i}.attn_q.weight" in model.w
    )
    off = build_model(tiny, DEVICE, backend="torch", fusions={"merged_qkv": False})
    assert off.merged_qkv == 0 and "blk.0.attn_q.weight" in off.w

"""MoE prompts on the triton backend (the grouped GEMM, `moe_grouped`) against the torch
reference at every micro-batch size, the quality gate of ik_llama.cpp PR 728's lesson (a fast
MoE path that raised perplexity by 0.4% on every model, found by users): a random qwen3moe model
(a one-layer micro one in the interpreter, tiny-qwen3moe on a GPU), one prompt fed in
micro-batches of 1..128 tokens (and 512, 2048 on a GPU); mean KL-divergence of the next-token
distributions < 1e-3 and the same top token at >= 99% of the positions.

The dense mat-muls run the exact GEMM (fp32 tiles, tf32x3 on a GPU) here, so that what is
measured is the MoE path's own rounding: with the bf16 GEMM before it, one token of this
4-expert micro model switches experts (a near-tie of the router, 1 position in 140, KLD 0.37
there), which is the dense GEMM's doing and gated on real models (tests/test_cuda_decode.py).
The grouped form against its unfused one (one launch per expert): the same bits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.gguf.synthetic import PRESETS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.runtime.engine import Engine

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
UBATCHES = (1, 2, 7, 8, 9, 31, 32, 33, 128) + ((512, 2048) if CUDA else ())
PROMPT_LEN = 2100 if CUDA else 140


def _preset():
    if CUDA:
        return "tiny-qwen3moe"
    return dataclasses.replace(
        PRESETS["tiny-qwen3moe"], name="micro-qwen3moe", n_layer=1, n_embd=64, n_head=2,
        n_head_kv=1, head_dim=32, n_ff=64, n_ff_expert=32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_file():
    return synthetic(_preset(), "q8_0", device=DEVICE)


@pytest.fixture(scope="module")
def prompt():
    gen = torch.Generator().manual_seed(1)
    return [int(i) for i in torch.randint(1, 300, (PROMPT_LEN,), generator=gen)]  # 320 tokens


@pytest.fixture(scope="module")
def reference_logits(model_file, prompt):
    ref = Engine(build_model(model_file, DEVICE, backend="torch"), n_ctx=PROMPT_LEN + 8)
    return ref.prefill(prompt, ref.new_sequence(), all_logits=True).float()


@pytest.fixture
def exact_dense(monkeypatch):
    """The dense mat-muls above the mat-vec on the exact GEMM (see the top)."""
    from kiln.kernels import linear as lin

    route = lin.route

    def exact_route(m, weight, device=None):
        how = route(m, weight, device)
        return "exact" if how in ("triton", "dequant") else how

    monkeypatch.setattr(lin, "route", exact_route)


def _prefill(model_file, prompt, ubatch, fusions=None):
    model = build_model(model_file, DEVICE, backend="triton", fusions=fusions)
    engine = Engine(model, n_ctx=PROMPT_LEN + 8, ubatch=ubatch)
    return engine.prefill(prompt, engine.new_sequence(), all_logits=True).float()


@pytest.mark.parametrize("ubatch", UBATCHES)
def test_moe_prompt_quality_at_every_micro_batch(
    model_file, prompt, reference_logits, exact_dense, ubatch
):
    # Below the grouped GEMM's threshold the per-token path runs (decode's kernels): in the
    # interpreter a prefix of the prompt is enough for it.
    n = len(prompt) if CUDA or ubatch > 8 else 24
    ours = _prefill(model_file, prompt[:n], ubatch)
    reference_logits = reference_logits[:n]
    log_p = torch.log_softmax(reference_logits, -1)
    log_q = torch.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    same_top = (ours.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    what = f"ubatch {ubatch}: mean KLD {kl.mean().item():.2e} (max {kl.max().item():.2e} at "
    what += f"{kl.argmax().item()}), same top {same_top:.4f}"
    assert kl.mean().item() < 1e-3, what
    assert same_top >= 0.99, what


def test_grouped_equals_its_unfused_form(model_file, prompt):
    chunk = prompt[:40]
    on = _prefill(model_file, chunk, 40)
    off = _prefill(model_file, chunk, 40, fusions={"moe_grouped": False})
    assert torch.equal(on, off)


def test_a_dense_model_split_into_experts(stories_model):
    """Real weights: stories260K with every FFN split into 4 experts (kiln.gguf.moe_split: all
    used, a zero router, exact by construction). The reference gives the dense model's logits;
    the triton backend's prompt (the grouped GEMM from 9 tokens) stays within the quality gate
    of the dense reference at micro-batches 33 and 128 (in the interpreter: 5.3e-5, 99.6% over
    512 tokens)."""
    from kiln.gguf import read_gguf
    from kiln.gguf.moe_split import experts_from_dense

    dense = read_gguf(stories_model)
    split = experts_from_dense(dense, 4)
    n = 512 if CUDA else 96
    gen = torch.Generator().manual_seed(0)
    ids = [1] + [int(i) for i in torch.randint(3, 500, (n - 1,), generator=gen)]

    def prefill(model, backend, ubatch=512):
        engine = Engine(build_model(model, DEVICE, backend=backend), n_ctx=n + 8, ubatch=ubatch)
        return engine.prefill(ids, engine.new_sequence(), all_logits=True).float()

    want = prefill(dense, "torch")
    assert split.config.moe and split.config.n_expert == 4 and not dense.config.moe
    same = prefill(split, "torch")
    assert (same - want).abs().max().item() < 1e-5 * (1 + want.abs().max().item())
    for ubatch in (33, 128):
        ours = prefill(split, "triton", ubatch)
        log_p, log_q = torch.log_softmax(want, -1), torch.log_softmax(ours, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        same_top = (ours.argmax(-1) == want.argmax(-1)).float().mean().item()
        what = f"ubatch {ubatch}: mean KLD {kl.mean().item():.2e}, same top {same_top:.4f}"
        assert kl.mean().item() < 1e-3 and same_top >= 0.99, what

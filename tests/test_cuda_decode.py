"""The GPU decode path (triton kernels, f16 KV cache, CUDA graphs) against the torch reference on
the demo model (skipped without a GPU):
- the same greedy tokens over 128 steps;
- mean KL-divergence of the next-token distributions below 1e-4 over a 512-token prompt, fed
  token by token through the decode step (the kernels' path), against the reference's logits;
- CUDA-graph replay bitwise equal to eager decoding;
- norm_quant (q8_1 activations, int8 mat-vecs), the same 512 tokens decoded one by one: mean
  KL-divergence below 2e-3 and the same top token at >= 99% of positions;
- prompts on the kernels (GEMM, flash attention) at ubatch 512, 128 and 33: mean KL-divergence
  below 1e-3 and the same top token at >= 99% of 512 positions, and the same 64 greedy tokens
  after the prompt.
"""

from __future__ import annotations

import pytest
import torch

from kiln.gguf import read_gguf
from kiln.models import build_model
from kiln.runtime.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N_CTX = 1024


@pytest.fixture(scope="module")
def demo(demo_model):
    return read_gguf(demo_model)


@pytest.fixture(scope="module")
def prompt(demo):
    from kiln.tokenizer import Tokenizer

    text = (
        "The history of the city begins in the early middle ages, when a small settlement grew "
        "around the river crossing. Merchants came from the north and the south, and by the "
        "twelfth century the town had a market, a church and a wall. "
    ) * 12
    ids = Tokenizer.from_gguf(demo).encode(text, add_special=True)
    assert len(ids) >= 512
    return ids[:512]


def decode_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits after each token, every token through engine.decode -> float32 [len(ids), V]."""
    cache = engine.new_sequence()
    rows = [engine.prefill(ids[:1], cache)[-1].clone()]
    for token in ids[1:]:
        rows.append(engine.decode(token, cache)[-1].clone())
    return torch.stack(rows).float()


def greedy(engine: Engine, prompt: list[int], steps: int = 128) -> list[int]:
    cache = engine.new_sequence()
    logits = engine.prefill(prompt, cache)
    out = []
    for _ in range(steps):
        token = int(torch.argmax(logits[-1]))
        out.append(token)
        logits = engine.decode(token, cache)
    return out


def kl_and_top(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-row KL(theirs || ours) and the share of rows with the same argmax."""
    log_p = torch.log_softmax(theirs.float(), -1)
    log_q = torch.log_softmax(ours.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl, (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def reference(demo):
    return Engine(build_model(demo, "cuda", backend="torch"), n_ctx=N_CTX)


def test_greedy_tokens_equal_the_reference(demo, prompt):
    gpu = Engine(build_model(demo, "cuda", backend="triton"), n_ctx=N_CTX)
    ref = Engine(build_model(demo, "cuda", backend="torch"), n_ctx=N_CTX)
    assert gpu.graphs is not None
    assert greedy(gpu, prompt[:32]) == greedy(ref, prompt[:32])


def test_kl_divergence_against_the_reference(demo, prompt):
    gpu = Engine(build_model(demo, "cuda", backend="triton"), n_ctx=N_CTX)
    ref = Engine(build_model(demo, "cuda", backend="torch"), n_ctx=N_CTX)
    ours = decode_logits(gpu, prompt)
    cache = ref.new_sequence()
    theirs = ref.prefill(prompt, cache, all_logits=True).float()
    log_p = torch.log_softmax(theirs, -1)
    log_q = torch.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    same_top = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"mean KLD {kl.mean().item():.3e}, max {kl.max().item():.3e}, same top {same_top:.4f}")
    assert kl.mean().item() < 1e-4
    assert same_top >= 0.99


def test_norm_quant_kl_divergence_against_the_reference(demo, prompt, reference):
    model = build_model(demo, "cuda", backend="triton", fusions={"norm_quant": True})
    assert model.norm_inputs is not None
    ours = decode_logits(Engine(model, n_ctx=N_CTX), prompt)
    theirs = reference.prefill(prompt, reference.new_sequence(), all_logits=True)
    kl, same_top = kl_and_top(ours, theirs)
    print(f"norm_quant: mean KLD {kl.mean().item():.3e}, max {kl.max().item():.3e}, same top "
          f"{same_top:.4f}")  # fmt: skip
    assert kl.mean().item() < 2e-3
    assert same_top >= 0.99


def test_cuda_graph_replay_is_bitwise_eager(demo, prompt):
    graphed = Engine(build_model(demo, "cuda", backend="triton"), n_ctx=N_CTX)
    eager = Engine(
        build_model(demo, "cuda", backend="triton", fusions={"cuda_graphs": False}), n_ctx=N_CTX
    )
    assert graphed.graphs is not None and eager.graphs is None
    ids = prompt[:96]
    assert torch.equal(decode_logits(graphed, ids), decode_logits(eager, ids))


@pytest.mark.parametrize("ubatch", [512, 128, 33])
def test_prompt_logits_on_the_kernels_against_the_reference(demo, prompt, reference, ubatch):
    gpu = Engine(build_model(demo, "cuda", backend="triton"), n_ctx=N_CTX, ubatch=ubatch)
    ours = gpu.prefill(prompt, gpu.new_sequence(), all_logits=True)
    theirs = reference.prefill(prompt, reference.new_sequence(), all_logits=True)
    kl, same_top = kl_and_top(ours, theirs)
    print(
        f"ubatch {ubatch}: mean KLD {kl.mean().item():.3e}, max {kl.max().item():.3e}, "
        f"same top {same_top:.4f}"
    )
    assert kl.mean().item() < 1e-3
    assert same_top >= 0.99


def test_greedy_after_a_kernel_prompt_equals_the_reference(demo, prompt, reference):
    gpu = Engine(build_model(demo, "cuda", backend="triton"), n_ctx=N_CTX)
    assert greedy(gpu, prompt, steps=64) == greedy(reference, prompt, steps=64)

"""The torch reference path on CUDA gives the CPU's results (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from kiln.gguf.synthetic import build_model as build_synthetic
from kiln.models import build_model
from kiln.runtime.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = [1, 17, 250, 33, 99, 4, 101, 7, 64, 128, 3, 90]


def _greedy_and_logits(engine: Engine, steps: int = 32):
    cache = engine.new_sequence()
    logits = engine.prefill(PROMPT, cache, all_logits=True)
    first = logits.cpu()
    tokens = []
    last = logits[-1:]
    for _ in range(steps):
        token = int(last[-1].argmax())
        tokens.append(token)
        last = engine.decode(token, cache)
    return first, tokens


@pytest.mark.parametrize(
    ("preset", "qtype"),
    [("tiny-llama", "q4_k_m"), ("tiny-qwen2", "q8_0"), ("tiny-qwen3", "q6_k"),
     ("tiny-qwen3moe", "q4_0")],
)  # fmt: skip
def test_cuda_matches_cpu(preset, qtype):
    model = build_synthetic(preset, qtype)  # the same bytes on both devices
    results = []
    for device in ("cpu", "cuda"):
        results.append(
            _greedy_and_logits(Engine(build_model(model, device, backend="torch"), n_ctx=128))
        )
    (cpu_logits, cpu_tokens), (gpu_logits, gpu_tokens) = results
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    assert gpu_tokens == cpu_tokens

"""Logits and greedy tokens against Hugging Face transformers on the same GGUF.

Tolerance: max |logit difference| <= 1e-3 * (1 + max |logit|). Both sides compute in float32
from bit-identical dequantized weights; what differs is summation order (matmul blocking,
attention softmax), which on these models measures ~1e-6 relative (4.9e-5 absolute on the demo
model's logits of magnitude 31). 1e-3 leaves room for BLAS differences across machines while
still failing on any real error (a wrong RoPE pairing or norm shows up at >1e-1).
"""

from __future__ import annotations

import pytest
import torch

from kiln.gguf import read_gguf
from kiln.models import build_model
from kiln.runtime.engine import Engine
from tests.models.hf_reference import hf_greedy_agrees, hf_logits, load_hf_model

RTOL = 1e-3
GREEDY_STEPS = 32


def kiln_engine(path) -> Engine:
    return Engine(build_model(read_gguf(path)), n_ctx=256)


def kiln_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    return engine.prefill(ids, engine.new_cache(), all_logits=True)


def kiln_greedy(engine: Engine, ids: list[int], steps: int) -> list[int]:
    cache = engine.new_cache()
    logits = engine.prefill(ids, cache)
    out = []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = engine.decode(token, cache)
    return out


def assert_matches_hf(path, prompt_ids: list[int]) -> None:
    hf = load_hf_model(path)
    engine = kiln_engine(path)
    ours, ref = kiln_logits(engine, prompt_ids), hf_logits(hf, prompt_ids)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    bound = RTOL * (1 + ref.abs().max().item())
    assert err <= bound, f"max |logit diff| {err:.3g} > {bound:.3g}"
    greedy = kiln_greedy(engine, prompt_ids, GREEDY_STEPS)
    assert hf_greedy_agrees(hf, prompt_ids, greedy) == [], f"kiln's greedy tokens: {greedy}"


def test_stories260k(stories_model):
    assert_matches_hf(stories_model, [1, 403, 154, 263, 93, 298])


def test_demo_model(demo_model):
    assert_matches_hf(demo_model, [1, 504, 3458, 282, 4649, 314, 8041, 30])


@pytest.mark.parametrize("steps", [GREEDY_STEPS])
def test_stories_greedy_once_upon_a_time(stories_model, steps):
    from kiln.tokenizer import Tokenizer

    model = read_gguf(stories_model)
    engine = Engine(build_model(model), n_ctx=256)
    tok = Tokenizer.from_gguf(model)
    text = tok.decode(kiln_greedy(engine, [tok.bos_id], steps))
    assert text.strip().startswith("Once upon a time"), text


SYNTHETIC = [
    ("tiny-llama", "q8_0"),
    ("tiny-llama", "q4_k_m"),
    ("tiny-qwen2", "q4_0"),
    ("tiny-qwen2", "f16"),
    ("tiny-qwen3", "q6_k"),
    ("tiny-qwen3", "q5_1"),
    ("tiny-qwen3moe", "q8_0"),
    ("tiny-qwen3moe", "q4_k_m"),
]


@pytest.mark.parametrize(("preset", "qtype"), SYNTHETIC)
def test_synthetic_models(tmp_path, preset, qtype):
    from kiln.gguf.synthetic import make_model_file

    path = make_model_file(preset, qtype, tmp_path / f"{preset}-{qtype}.gguf", progress=False)
    assert_matches_hf(path, [1, 17, 250, 33, 99, 4, 101, 7])

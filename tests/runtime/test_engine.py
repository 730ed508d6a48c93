"""KV-cache decoding equals one full forward pass; micro-batch size does not change results.

Beyond rounding: float32 sums in another order differ by ~1e-5 on logits of magnitude ~10,
so the bound is 1e-4 absolute and relative."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import UsageError
from kiln.gguf import read_gguf
from kiln.models import build_model
from kiln.runtime.engine import Engine

IDS = [1, 403, 1543, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365, 2354, 29889, 2296]


@pytest.fixture(scope="module")
def stories_engine(stories_model) -> Engine:
    return Engine(build_model(read_gguf(stories_model)), n_ctx=64, ubatch=512)


def _ids(engine: Engine) -> list[int]:
    return [i % engine.config.n_vocab for i in IDS]


def test_decode_token_by_token_equals_full_forward(stories_engine):
    ids = _ids(stories_engine)
    full = stories_engine.prefill(ids, stories_engine.new_sequence(), all_logits=True)
    cache = stories_engine.new_sequence()
    steps = [stories_engine.prefill(ids[:4], cache)]
    steps += [stories_engine.decode(t, cache) for t in ids[4:]]
    torch.testing.assert_close(torch.cat(steps), full[3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ubatch", [1, 3, 7, 16])
def test_micro_batch_size_does_not_change_logits(stories_engine, ubatch):
    ids = _ids(stories_engine)
    full = stories_engine.prefill(ids, stories_engine.new_sequence(), all_logits=True)
    engine = Engine(stories_engine.model, n_ctx=64, ubatch=ubatch)
    split = engine.prefill(ids, engine.new_sequence(), all_logits=True)
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)


def test_cache_grows_past_its_first_allocation(stories_model):
    engine = Engine(build_model(read_gguf(stories_model)), n_ctx=600)
    cache = engine.new_sequence()
    ids = [(7 * i) % engine.config.n_vocab for i in range(300)]
    engine.prefill(ids, cache)
    assert cache.length == 300 and engine.pool.rows >= 300


def test_context_overflow_is_a_clear_error(stories_engine):
    cache = stories_engine.new_sequence()
    with pytest.raises(UsageError, match="do not fit the context of 64"):
        stories_engine.prefill([1] * 65, cache)
    stories_engine.prefill([1] * 64, cache)
    with pytest.raises(UsageError, match="context"):
        stories_engine.decode(1, cache)


def test_bad_ids(stories_engine):
    with pytest.raises(UsageError, match="empty"):
        stories_engine.prefill([], stories_engine.new_sequence())
    with pytest.raises(UsageError, match="outside the vocabulary"):
        stories_engine.prefill([1, 100000], stories_engine.new_sequence())


def test_bad_engine_settings(stories_engine):
    with pytest.raises(UsageError, match="ubatch"):
        Engine(stories_engine.model, n_ctx=64, ubatch=0)
    with pytest.raises(UsageError, match="context size"):
        Engine(stories_engine.model, n_ctx=0)


def test_triton_engine_keeps_an_f16_pool_of_the_full_context(stories_model):
    """The triton backend's engine (Triton's interpreter on a CPU) starts its f16 pool at one full
    context, so a single sequence never makes it grow (captured graphs read its tensors); a
    freed sequence is refused, not silently decoded into blocks someone else may own."""
    cuda = torch.cuda.is_available()
    model = build_model(read_gguf(stories_model), "cuda" if cuda else "cpu", backend="triton")
    engine = Engine(model, n_ctx=32)
    assert (engine.graphs is not None) == cuda  # CUDA graphs on a GPU only
    assert engine.pool.dtype == torch.float16 and engine.pool.rows >= 32
    seq = engine.new_sequence()
    engine.prefill([1, 2, 3], seq)
    seq.free()
    with pytest.raises(UsageError, match="freed"):
        engine.decode(1, seq)


def test_warm_up_runs_every_batch_shape_and_leaves_no_state(stories_model):
    """Engine.warm_up (kiln serve, before listening): the pool allocated whole, one forward per
    decode batch size and prompt size of its list (a GEMM row bucket's top and one less, up
    to n_seq rows and ubatch tokens), every sequence it used freed, and the results after it
    those of an engine that never warmed up. Nothing runs on the CPU unless forced."""
    model = build_model(read_gguf(stories_model))
    cold, warm = (
        Engine(model, n_ctx=400, n_seq=3, ubatch=20),
        Engine(model, n_ctx=400, n_seq=3, ubatch=20),
    )
    assert warm.warm_up() == 0 and warm.pool.n_blocks < warm.pool.max_blocks
    shapes, forms = [], []
    step = warm.step
    warm.step = lambda entries, logits="last": (
        shapes.append([len(i) for _, i in entries]) or forms.append(logits) or step(entries, logits)
    )
    free = warm.pool.max_blocks - 1  # all but the scratch block
    # decode batches of 1, 2, 3 rows (each once as prompts, once through decode_batch: eager on
    # the CPU); prompts of 2, 3, 4, 7, 8, 15, 16 and 20 tokens (ubatch)
    assert warm.warm_up(force=True) == 2 * 3 + 8
    assert shapes[:6] == [[1], [1], [1, 1], [1, 1], [1, 1, 1], [1, 1, 1]]
    assert [s[0] for s in shapes[6:]] == [2, 3, 4, 7, 8, 15, 16, 20]
    assert forms[6:] == ["last"] * 8  # no prompt graphs: no forward without logits
    assert warm.pool.n_blocks == warm.pool.max_blocks and warm.pool.free_blocks == free
    # a context smaller than ubatch: a prompt size is spread over sequences of <= n_ctx - 1
    small = Engine(model, n_ctx=16, n_seq=3, ubatch=40)
    shapes.clear()
    small.step = lambda entries, logits="last": (
        shapes.append([len(i) for _, i in entries]) or Engine.step(small, entries, logits)
    )
    assert small.warm_up(force=True) == 2 * 3 + 10
    assert shapes[6:] == [
        [2],
        [3],
        [4],
        [7],
        [8],
        [15],
        [15, 1],
        [15, 15, 1],
        [15, 15, 2],
        [15, 15, 10],
    ]
    assert small.pool.free_blocks == small.pool.max_blocks - 1
    ids = _ids(warm)
    a = cold.prefill(ids, cold.new_sequence(), all_logits=True)
    b = warm.prefill(ids, warm.new_sequence(), all_logits=True)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

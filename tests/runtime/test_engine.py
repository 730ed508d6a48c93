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
    full = stories_engine.prefill(ids, stories_engine.new_cache(), all_logits=True)
    cache = stories_engine.new_cache()
    steps = [stories_engine.prefill(ids[:4], cache)]
    steps += [stories_engine.decode(t, cache) for t in ids[4:]]
    torch.testing.assert_close(torch.cat(steps), full[3:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ubatch", [1, 3, 7, 16])
def test_micro_batch_size_does_not_change_logits(stories_engine, ubatch):
    ids = _ids(stories_engine)
    full = stories_engine.prefill(ids, stories_engine.new_cache(), all_logits=True)
    engine = Engine(stories_engine.model, n_ctx=64, ubatch=ubatch)
    split = engine.prefill(ids, engine.new_cache(), all_logits=True)
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)


def test_cache_grows_past_its_first_allocation(stories_model):
    engine = Engine(build_model(read_gguf(stories_model)), n_ctx=600)
    cache = engine.new_cache()
    ids = [(7 * i) % engine.config.n_vocab for i in range(300)]
    engine.prefill(ids, cache)
    assert cache.length == 300 and cache.capacity >= 300


def test_context_overflow_is_a_clear_error(stories_engine):
    cache = stories_engine.new_cache()
    with pytest.raises(UsageError, match="do not fit the context of 64"):
        stories_engine.prefill([1] * 65, cache)
    stories_engine.prefill([1] * 64, cache)
    with pytest.raises(UsageError, match="context"):
        stories_engine.decode(1, cache)


def test_bad_ids(stories_engine):
    with pytest.raises(UsageError, match="empty"):
        stories_engine.prefill([], stories_engine.new_cache())
    with pytest.raises(UsageError, match="outside the vocabulary"):
        stories_engine.prefill([1, 100000], stories_engine.new_cache())


def test_bad_engine_settings(stories_engine):
    with pytest.raises(UsageError, match="ubatch"):
        Engine(stories_engine.model, n_ctx=64, ubatch=0)
    with pytest.raises(UsageError, match="context size"):
        Engine(stories_engine.model, n_ctx=0)


def test_static_engine_reuses_its_one_cache(stories_model):
    """The triton backend's engine (Triton's interpreter here) keeps one f16 cache at the full
    context, emptied per request; decoding into another cache is refused, not silently wrong
    (captured graphs point at the engine's own buffers)."""
    from kiln.runtime.kv_cache import KVCache

    engine = Engine(build_model(read_gguf(stories_model), backend="triton"), n_ctx=32)
    assert engine.static and not engine.graphs  # no CUDA graphs on a CPU
    cache = engine.new_cache()
    assert cache.capacity == 32 and cache.k[0].dtype == torch.float16
    cache.length = 5
    assert engine.new_cache() is cache and cache.length == 0
    other = KVCache(engine.config, 32, engine.device)
    with pytest.raises(UsageError, match="engine.new_cache"):
        engine.decode(1, other)

"""The paged KV pool: block allocation at block boundaries, forks that share blocks and copy the
partial last one on write, freeing and reuse, and a pool that runs out (a clear error, never a
corrupted neighbour). The pool is checked directly and through a model: a sequence's logits
do not depend on where its blocks lie or on what its neighbours do."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import UsageError
from kiln.gguf import read_gguf
from kiln.models import build_model
from kiln.runtime.engine import Engine, PromptCache
from kiln.runtime.kv_pool import SCRATCH_BLOCK, KVPool, KVPoolFull

BS = 16


@pytest.fixture(scope="module")
def model(stories_model):
    return build_model(read_gguf(stories_model), "cpu", backend="torch")


def _pool(model, n_ctx=64, n_seq=2) -> KVPool:
    return KVPool(model.config, n_ctx, n_seq, torch.device("cpu"), block_size=BS)


@pytest.mark.parametrize("length", [BS - 1, BS, BS + 1, 3 * BS])
def test_blocks_at_boundaries(model, length):
    pool = _pool(model)
    seq = pool.new_sequence()
    pool.reserve(seq, length)
    assert len(seq.blocks) == -(-length // BS) and SCRATCH_BLOCK not in seq.blocks
    seq.length = length
    pool.reserve(seq, 1)  # one more token: a new block exactly when the last one is full
    assert len(seq.blocks) == -(-(length + 1) // BS)
    rows = {seq.slot(p) for p in range(length + 1)}
    assert len(rows) == length + 1 and all(r // BS in seq.blocks for r in rows)


def test_free_and_reuse(model):
    pool = _pool(model, n_ctx=2 * BS, n_seq=2)
    a, b = pool.new_sequence(), pool.new_sequence()
    pool.reserve(a, 2 * BS)
    pool.reserve(b, 2 * BS)
    assert pool.free_blocks == 0
    freed = list(a.blocks)
    a.free()
    assert pool.free_blocks == 2
    c = pool.new_sequence()
    pool.reserve(c, 2 * BS)
    assert sorted(c.blocks) == sorted(freed)
    c.length = 2 * BS
    c.truncate(3)  # blocks past the end go back
    assert len(c.blocks) == 1 and pool.free_blocks == 1


def test_a_full_pool_is_a_clear_error_and_changes_nobody(model):
    pool = _pool(model, n_ctx=2 * BS, n_seq=1)
    a = pool.new_sequence()
    pool.reserve(a, 2 * BS)
    before = list(a.blocks)
    b = pool.new_sequence()
    with pytest.raises(KVPoolFull, match=r"KV cache is full.*1 sequence\(s\) of 32 tokens"):
        pool.reserve(b, 1)
    assert isinstance(KVPoolFull("x"), UsageError)
    assert a.blocks == before and b.blocks == []


def test_fork_shares_blocks_and_copies_the_partial_one_on_write(model):
    pool = _pool(model)
    parent = pool.new_sequence()
    pool.reserve(parent, BS + 5)
    parent.length = BS + 5
    for t in pool.k + pool.v:
        t.normal_()
    child = pool.fork(parent)
    assert child.blocks == parent.blocks and pool.refs[parent.blocks[0]] == 2
    pool.reserve(child, 1)  # the child writes at BS + 5: its partial block becomes its own
    assert child.blocks[0] == parent.blocks[0] and child.blocks[1] != parent.blocks[1]
    for t in pool.k:
        src, dst = parent.blocks[1], child.blocks[1]
        assert torch.equal(t[src * BS : src * BS + 5], t[dst * BS : dst * BS + 5])
    child.free()
    assert pool.refs[parent.blocks[0]] == 1 and pool.refs[parent.blocks[1]] == 1


def _greedy(engine, seq, logits, n):
    out = []
    for _ in range(n):
        token = int(torch.argmax(logits[-1]))
        out.append(token)
        logits = engine.decode(token, seq)
    return out


def test_forked_sequences_diverge_without_touching_each_other(model):
    """A prompt, forked at a length inside a block; the two continue with different tokens.
    Each equals the same continuation run from scratch alone."""
    engine = Engine(model, n_ctx=96, n_seq=3, block_size=BS)
    prompt = [1, 5, 9, 14, 3, 77, 21, 8, 300, 2, 41, 19, 7, 66, 90, 11, 13, 250, 33, 4]
    base = engine.new_sequence()
    engine.prefill(prompt, base)
    fork = engine.fork(base)
    a = _greedy(engine, base, engine.decode(3, base), 20)
    b = _greedy(engine, fork, engine.decode(400, fork), 20)
    for first, got in ((3, a), (400, b)):
        alone = engine.new_sequence()
        engine.prefill(prompt, alone)
        want = _greedy(engine, alone, engine.decode(first, alone), 20)
        assert got == want
        alone.free()
    assert a != b


def test_logits_do_not_depend_on_where_the_blocks_lie(model):
    """Interleaved allocation scatters a sequence's blocks; its logits equal those of a
    sequence with consecutive blocks (the reference reads a slice there, a gather here)."""
    ids = [(i * 37 + 11) % model.config.n_vocab for i in range(3 * BS + 3)]
    engine = Engine(model, n_ctx=4 * BS, n_seq=3, block_size=BS)
    alone = engine.new_sequence()
    want = engine.prefill(ids, alone, all_logits=True)
    alone.free()
    seqs = [engine.new_sequence() for _ in range(3)]
    got = None
    for s in range(0, len(ids), BS):  # the three take turns: their blocks interleave
        for i, seq in enumerate(seqs):
            out = engine.prefill(ids[s : s + BS] if i == 1 else [7] * len(ids[s : s + BS]), seq,
                                 all_logits=True)  # fmt: skip
            if i == 1:
                got = out if got is None else torch.cat([got, out])
    assert seqs[1].first_row() is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_cache_gives_way_and_its_owner_starts_over(model):
    engine = Engine(model, n_ctx=2 * BS, n_seq=1, block_size=BS)
    cache = PromptCache(engine)
    seq, n = cache.take([1, 2, 3])
    engine.prefill([1, 2, 3], seq)
    cache.keep(seq, [1, 2, 3])
    other = engine.new_sequence()
    engine.prefill([5] * (2 * BS), other)  # needs every block: the kept sequence is dropped
    assert cache.ids == [] and seq.freed
    other.free()
    seq, n = cache.take([1, 2, 3, 4])
    assert n == 0

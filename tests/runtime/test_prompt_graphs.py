"""The prompt_graphs fusion (kiln/runtime/prompt_graphs.py): which forwards replay a prompt graph
(on the CPU, with a recording stand-in), and on a GPU that a prompt's graphs give the eager
forward's logits bit for bit, the same K/V in the pool and the same greedy tokens after, at
depth 0 and deeper, for a forked sequence too."""

from __future__ import annotations

import pytest
import torch

from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.quant.kv import QuantizedRows
from kiln.runtime.engine import Engine
from kiln.runtime.prompt_graphs import PromptGraphs

CUDA = torch.cuda.is_available()
UBATCH = 32


class _Pool:
    generation = 0


class _Recorder:
    """A stand-in for an engine's PromptGraphs: records the chunks it is given and returns
    fixed logits (or None: a failed capture)."""

    def __init__(self, tokens: int, n_vocab: int, fail: bool = False):
        self.real = PromptGraphs(None, _Pool(), tokens)
        self.calls: list[tuple[int, int, str]] = []
        self.n_vocab, self.fail = n_vocab, fail

    def serves(self, entries, logits):
        return self.real.serves(entries, logits)

    def __call__(self, seq, ids, logits):
        self.calls.append((seq.length, len(ids), logits))
        return None if self.fail else torch.zeros(1, self.n_vocab)


def test_only_one_sequences_full_chunks_with_last_or_no_logits_replay():
    graphs = PromptGraphs(None, _Pool(), 8)
    a, b = object(), object()
    assert graphs.serves([(a, [1] * 8)], "last") and graphs.serves([(a, [1] * 8)], "none")
    assert not graphs.serves([(a, [1] * 8)], "all")  # every row's logits: eager
    assert not graphs.serves([(a, [1] * 7)], "last")  # a partial chunk
    assert not graphs.serves([(a, [1] * 4), (b, [1] * 4)], "last")  # two sequences
    graphs.failed = "RuntimeError: capture"
    assert not graphs.serves([(a, [1] * 8)], "last")


def _engine(prompt_graphs: bool, device: str = "cpu", cache: str | None = None) -> Engine:
    gguf = synthetic("tiny-qwen3", "q8_0", device=device)
    on_gpu = device == "cuda"
    fusions = {"prompt_graphs": prompt_graphs} if on_gpu else None
    model = build_model(gguf, device, backend="triton" if on_gpu else "torch", fusions=fusions)
    return Engine(model, n_ctx=256, ubatch=UBATCH, n_seq=2, cache_type_k=cache, cache_type_v=cache)


def test_engine_gives_the_prompt_graphs_full_chunks_and_advances_the_length():
    engine = _engine(False)
    engine.prompt_graphs = rec = _Recorder(UBATCH, engine.config.n_vocab)
    seq = engine.new_sequence()
    engine.prefill(list(range(1, 2 * UBATCH + 6)), seq)  # two full chunks, then 5 tokens
    assert rec.calls == [(0, UBATCH, "none"), (UBATCH, UBATCH, "none")]  # the rest: eager
    assert seq.length == 2 * UBATCH + 5
    engine.prefill(list(range(1, UBATCH + 1)), seq, all_logits=True)  # every row read: eager
    assert len(rec.calls) == 2 and seq.length == 3 * UBATCH + 5


def test_warm_up_gives_the_prompt_graphs_both_forms_of_a_full_chunk():
    """Before a server listens: the full micro-batch with the last token's logits and without
    (a long prompt's leading chunks), so neither graph is captured mid-request."""
    engine = _engine(False)
    engine.prompt_graphs = rec = _Recorder(UBATCH, engine.config.n_vocab)
    engine.warm_up(force=True)
    assert rec.calls == [(0, UBATCH, "last"), (0, UBATCH, "none")]


def test_a_failed_capture_runs_the_chunk_eagerly():
    engine = _engine(False)
    ref = _engine(False)
    engine.prompt_graphs = _Recorder(UBATCH, engine.config.n_vocab, fail=True)
    prompt = list(range(3, 3 + UBATCH))
    a, b = engine.new_sequence(), ref.new_sequence()
    assert torch.equal(engine.prefill(prompt, a), ref.prefill(prompt, b))
    assert a.length == b.length == UBATCH


def _run(engine: Engine, prompts: list[list[int]], steps: int = 16):
    """Each prompt prefilled after the last (the second forked from the first: a shared
    prefix), then greedy steps -> (the prompts' last logits, the tokens, the sequences)."""
    first = engine.new_sequence()
    logits = [engine.prefill(prompts[0], first)]
    second = engine.fork(first)
    logits.append(engine.prefill(prompts[1], second))  # at depth len(prompts[0])
    tokens = []
    for seq, lg in zip((first, second), logits):
        out = [int(lg[-1].argmax())]
        for _ in range(steps):
            out.append(int(engine.decode(out[-1], seq)[-1].argmax()))
        tokens.append(out)
    return logits, tokens, (first, second)


def _stored(pool, rows: torch.Tensor) -> torch.Tensor:
    """The stored rows of a layer's pool: floats, or a block type's bytes (QuantizedRows)."""
    picked = pool[rows]
    return picked.data if isinstance(picked, QuantizedRows) else picked


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_prompt_graphs_give_the_eager_logits_kv_and_tokens(cache):
    on, off = _engine(True, "cuda", cache), _engine(False, "cuda", cache)
    assert on.prompt_graphs is not None and off.prompt_graphs is None
    n = on.config.n_vocab
    prompts = [
        [(7 * j + 1) % n for j in range(2 * UBATCH + 3)],
        [(5 * j + 2) % n for j in range(UBATCH)],
    ]
    lg_on, tok_on, seqs_on = _run(on, prompts)
    lg_off, tok_off, seqs_off = _run(off, prompts)
    assert on.prompt_graphs.failed is None and set(on.prompt_graphs._graphs) == {"last", "none"}
    for a, b in zip(lg_on, lg_off):
        assert torch.equal(a, b)
    assert tok_on == tok_off
    for s_on, s_off in zip(seqs_on, seqs_off):
        assert s_on.blocks == s_off.blocks and s_on.length == s_off.length
    rows = torch.tensor([seqs_on[1].slot(p) for p in range(seqs_on[1].length)], device="cuda")
    for layer in range(on.config.n_layer):
        for pool_on, pool_off in ((on.pool.k, off.pool.k), (on.pool.v, off.pool.v)):
            assert torch.equal(_stored(pool_on[layer], rows), _stored(pool_off[layer], rows))

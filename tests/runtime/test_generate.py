"""generate_stream's overlap (stories260K, torch backend): the next decode step launched with the
token just selected still on the device gives the same pieces, tokens, finish reason and
log-probabilities as reading each token first, for every way a reply ends; the sequence a
PromptCache keeps holds no token past the history."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.runtime.engine import PromptCache
from kiln.runtime.generate import Completion, generate_stream
from kiln.runtime.sampler import SamplingParams
from tests.server.test_overlap import PeriodEnds

CASES = {
    "length": SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    "one token": SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    "eos": SamplingParams(temperature=0, max_tokens=60),
    "stop": SamplingParams(temperature=0.9, seed=0, max_tokens=80, stop=(" named",)),
    "context": SamplingParams(temperature=0.8, seed=9, max_tokens=500, ignore_eos=True),
    "penalties": SamplingParams(temperature=0, max_tokens=30, repeat_penalty=1.3),
}


@pytest.fixture(scope="module")
def llm(stories_model):
    return kiln.LLM(stories_model, backend="torch", n_ctx=96, verbose=False)


def _run(llm, params, overlap: bool, logprobs=None):
    cache = PromptCache(llm.engine)
    ids = llm.encode_prompt("Once upon a time")
    result = Completion()
    tok = PeriodEnds(llm.tokenizer)
    pieces = list(generate_stream(llm.engine, tok, ids, params, result, cache, logprobs, overlap))
    kept = cache._seq.length
    cache.clear()
    return pieces, result, kept, len(ids) + len(result.token_ids)


@pytest.mark.parametrize("case", CASES)
def test_overlap_yields_what_reading_each_token_first_yields(llm, case):
    params = CASES[case]
    logprobs = 2 if case == "stop" else None
    pieces, fast, kept, history = _run(llm, params, True, logprobs)
    slow_pieces, slow, slow_kept, _ = _run(llm, params, False, logprobs)
    assert pieces == slow_pieces and fast.text == slow.text
    assert fast.token_ids == slow.token_ids and fast.finish_reason == slow.finish_reason
    if logprobs is not None:
        assert [c.token for c in fast.logprobs] == [c.token for c in slow.logprobs]
        assert [c.logprob for c in fast.logprobs] == pytest.approx(
            [c.logprob for c in slow.logprobs], abs=1e-5
        )
    want = {"one token": "length", "penalties": "eos"}.get(case, case)
    assert fast.finish_reason == want, fast.finish_reason
    # Read first, the sequence holds the history but the last token (all of it after an EOS,
    # which is not in it). Overlapped, a reply that ended when its last token was read had one
    # step more: its stop-string token stays, an EOS is dropped; max_tokens and the context end
    # are known before, with no extra step.
    assert slow_kept == history - (want != "eos")
    assert kept == history - (want in ("length", "context")), (want, kept, history)


def test_overlap_decodes_ahead_with_the_token_on_the_device(llm, monkeypatch):
    seen = []
    decode = llm.engine.decode_batch

    def watched(tokens, seqs):
        seen.append(isinstance(tokens, torch.Tensor))
        return decode(tokens, seqs)

    monkeypatch.setattr(llm.engine, "decode_batch", watched)
    _run(llm, CASES["length"], True)
    assert seen and all(seen)
    seen.clear()
    _run(llm, CASES["penalties"], True)
    assert seen and not any(seen)

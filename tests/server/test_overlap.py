"""The scheduler's overlap (stories260K, torch backend): a decode step launched with the ids the
last step selected before they are read gives every request the same tokens, text, finish
reason and log-probabilities as the loop that reads each step's ids first; a row that ends at
read time (an EOS, a stop string) keeps no token past its history; rows whose penalties read
the history make the loop wait; a row whose logits break fails alone."""

from __future__ import annotations

import threading

import pytest
import torch

import kiln
from kiln.runtime.sampler import SamplingParams
from kiln.runtime.scheduler import Scheduler
from tests.server.test_server import paused

PROMPTS = ("Once upon a time", "Lily", "The dog ran", "One day", "Tom had a", "The sun")


class Collector:
    def __init__(self):
        self.result, self.error, self.done = None, None, threading.Event()

    def __call__(self, event):
        if event.done:
            self.result, self.error = event.result, event.error
            self.done.set()


def _requests():
    """(prompt, params, logprobs): greedy and seeded draws; stop strings, short and long
    max_tokens; log-probabilities; one row with a repeat penalty."""
    return [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), None),
        (PROMPTS[1], SamplingParams(temperature=0.9, seed=3, max_tokens=57), 2),
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=90, stop=(" park",)), None),
        (PROMPTS[3], SamplingParams(temperature=0.7, seed=11, max_tokens=3, ignore_eos=True), None),
        (PROMPTS[4], SamplingParams(temperature=0, max_tokens=1), 0),
        (PROMPTS[5], SamplingParams(temperature=0.8, seed=5, max_tokens=64, stop=("Lily",)), None),
    ]


def _llm(path, n_seq=4):
    return kiln.LLM(path, backend="torch", n_ctx=256, ubatch=16, n_seq=n_seq, verbose=False)


class PeriodEnds:
    """The model's tokenizer with "." as an end-of-generation token (stories260K writes no EOS
    in a short test): a row then ends when a token is read that the next step already took."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        period = tokenizer.encode(".", add_special=False)[-1]  # after SPM's space prefix
        self.eog_ids = tokenizer.eog_ids | {period}

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _serve(
    llm, requests, overlap: bool, spy: list | None = None, tokenizer=None, ok=True, mix=False
):
    """Every request submitted while the loop is held, so that both runs batch the same way
    -> (the Collectors, the prefix cache's kept sequences: {its first token ids: its length})."""
    tokenizer = tokenizer or llm.tokenizer
    s = Scheduler(llm.engine, tokenizer, prefix_cache=8, overlap=overlap, mix=mix)
    if spy is not None:
        decode = llm.engine.decode_batch

        def watched(tokens, seqs):
            spy.append(isinstance(tokens, torch.Tensor))
            return decode(tokens, seqs)

        llm.engine.decode_batch = watched
    try:
        out = []
        with paused(s):
            for prompt, params, logprobs in requests:
                c = Collector()
                ids = llm.encode_prompt(prompt) if isinstance(prompt, str) else prompt
                s.submit(ids, params, c, logprobs=logprobs)
                out.append(c)
        for c in out:
            assert c.done.wait(60), "a request did not finish"
            assert c.error is None or not ok, c.error
        kept = s.call(lambda: {tuple(ids[:4]): seq.length for seq, ids in s.cache.entries.values()})
        return out, kept
    finally:
        s.close()
        if spy is not None:
            del llm.engine.decode_batch


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason
    if a.logprobs is None:
        assert b.logprobs is None
    else:
        # the values to float32 rounding: a batch of other rows (a row's one extra step) moves
        # the reference matmul's last bits
        def ids(c):
            return [c.token, *(t for t, _ in c.top)]

        def values(c):
            return [c.logprob, *(v for _, v in c.top)]

        assert [ids(c) for c in a.logprobs] == [ids(c) for c in b.logprobs]
        for x, y in zip(a.logprobs, b.logprobs):
            assert values(x) == pytest.approx(values(y), abs=1e-4)


@pytest.mark.parametrize("n_seq", [2, 4])
def test_overlap_gives_every_request_what_the_waiting_loop_gives(stories_model, n_seq):
    """n_seq 2: requests wait for slots, rows join and leave the running batch between steps
    (the next step's ids gathered from the last step's and the new rows'); 4: most run at once."""
    llm = _llm(stories_model, n_seq)
    requests = _requests()
    spy: list[bool] = []
    fast, kept = _serve(llm, requests, overlap=True, spy=spy, tokenizer=PeriodEnds(llm.tokenizer))
    slow, kept_slow = _serve(llm, requests, overlap=False, tokenizer=PeriodEnds(llm.tokenizer))
    for a, b in zip(fast, slow):
        _same(a.result, b.result)
    reasons = {c.result.finish_reason for c in fast}
    assert reasons == {"length", "stop", "eos"}, reasons  # every way of ending is covered
    assert any(spy), "no step was launched with the last step's ids on the device"
    # Waiting, a row's sequence holds its history but the last token (read, never decoded), or
    # all of it when an EOS (not in the history) ended it. Overlapped, a row that ended when its
    # last token was read had one more step: its stop-string token (in the history) stays, its
    # EOS may not. A row ended by max_tokens had no extra step.
    assert kept.keys() == kept_slow.keys() and len(kept) == len(requests)
    by_start = {}
    for (prompt, _, _), c in zip(requests, fast):
        ids = llm.encode_prompt(prompt) + c.result.token_ids
        by_start[tuple(ids[:4])] = (len(ids), c.result.finish_reason)
    for start, length in kept.items():
        history, reason = by_start[start]
        assert kept_slow[start] == history - (reason != "eos"), (reason, history)
        assert length == history - (reason == "length"), (reason, length, history)


def test_greedy_overlap_matches_generate(stories_model):
    llm = _llm(stories_model)
    params = SamplingParams(temperature=0, max_tokens=33)
    out, _ = _serve(llm, [(p, params, None) for p in PROMPTS[:4]], overlap=True)
    for prompt, c in zip(PROMPTS, out):
        assert c.result.token_ids == llm.generate(llm.encode_prompt(prompt), params).token_ids


def test_a_penalized_row_makes_every_step_wait_for_its_ids(stories_model):
    llm = _llm(stories_model)
    penalized = SamplingParams(temperature=0, max_tokens=30, repeat_penalty=1.3)
    plain = SamplingParams(temperature=0, max_tokens=30)
    spy: list[bool] = []
    out, _ = _serve(llm, [(PROMPTS[0], penalized, None), (PROMPTS[1], plain, None)], True, spy)
    assert spy and not any(spy)
    want = llm.generate(llm.encode_prompt(PROMPTS[0]), penalized)
    assert out[0].result.token_ids == want.token_ids


@pytest.mark.parametrize("overlap", [True, False])
def test_a_row_with_broken_logits_fails_alone(stories_model, overlap):
    """One request's logits turn NaN at its 6th decode step: it ends with the model output
    error, the others finish as they would alone (with overlap the broken row's -1 id, fed to
    the next step on the device, decodes as 0 and is never read)."""
    from kiln.errors import ModelOutputError

    llm = _llm(stories_model)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [llm.encode_prompt(p) for p in PROMPTS[:3]]
    engine = llm.engine
    step, decode = engine.step, engine.decode_batch
    victim: dict = {}

    def stepped(entries, logits="last", tokens=None):
        for seq, ids in entries:
            if list(ids) == prompts[1]:  # its whole prompt: one chunk (ubatch 16)
                victim["seq"], victim["steps"] = seq, 0
        return step(entries, logits, tokens)

    def broken(tokens, seqs):
        logits = decode(tokens, seqs).clone()
        for i, seq in enumerate(seqs):
            if seq is victim.get("seq"):
                victim["steps"] += 1
                if victim["steps"] >= 6:
                    logits[i, 3] = float("nan")
        return logits

    engine.step, engine.decode_batch = stepped, broken
    try:
        out, _ = _serve(llm, [(p, params, None) for p in prompts], overlap, ok=False)
    finally:
        del engine.step, engine.decode_batch
    assert victim["steps"] >= 6
    assert isinstance(out[1].error, ModelOutputError), out[1].error
    assert len(out[1].result.token_ids) == 6  # the prompt's token, 5 good decode steps
    for i in (0, 2):
        assert out[i].error is None, out[i].error
        assert out[i].result.token_ids == llm.generate(prompts[i], params).token_ids


@pytest.mark.parametrize("overlap", [True, False])
def test_prompt_chunks_beside_decode_tokens_give_the_same_replies(stories_model, overlap):
    """mix: an iteration's prompt chunks run in the decode step's forward (a long prompt in
    chunks of ubatch while the others decode; rows joining after their prompt); every reply is
    what separate forwards give."""
    llm = _llm(stories_model, n_seq=3)
    long = "The little dog ran to the park and saw a big red ball. " * 4
    requests = _requests()[:4] + [(long, SamplingParams(temperature=0, max_tokens=12), None)]
    step, mixed = llm.engine.step, []

    def watched(entries, logits="last", tokens=None):
        lengths = {len(ids) for _, ids in entries}
        mixed.append(1 in lengths and len(lengths) > 1)
        return step(entries, logits, tokens)

    llm.engine.step = watched
    try:
        fast, _ = _serve(llm, requests, overlap, mix=True, tokenizer=PeriodEnds(llm.tokenizer))
    finally:
        del llm.engine.step
    slow, _ = _serve(llm, requests, overlap=False, tokenizer=PeriodEnds(llm.tokenizer))
    for a, b in zip(fast, slow):
        _same(a.result, b.result)
    assert any(mixed), "no forward held prompt chunks beside decode tokens"

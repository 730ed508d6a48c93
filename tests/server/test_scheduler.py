"""The serving scheduler on its own (stories260K, torch backend): continuous batching with
chunked prompts, prefix reuse through copy-on-write forks, the prefix cache given up when the
pool needs room, and requests that fail or go away alone."""

from __future__ import annotations

import threading
import time

import pytest

import kiln
from kiln.errors import UsageError
from kiln.runtime.sampler import SamplingParams
from kiln.runtime.scheduler import QueueFull, Scheduler
from tests.server.test_server import paused

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _llm(path, n_seq=4, n_ctx=512, ubatch=16):
    return kiln.LLM(path, backend="torch", n_ctx=n_ctx, ubatch=ubatch, n_seq=n_seq, verbose=False)


@pytest.fixture(scope="module")
def ref(stories_model):
    return _llm(stories_model)


class Collector:
    def __init__(self, log=None, name=""):
        self.text, self.done, self.result, self.error = "", threading.Event(), None, None
        self.log, self.name, self.tokens = log, name, 0

    def __call__(self, event):
        self.text += event.text
        if event.choice is not None:
            self.tokens += 1
            if self.log is not None:
                self.log.append(self.name)
        if event.done:
            self.result, self.error = event.result, event.error
            self.done.set()

    def wait(self):
        assert self.done.wait(30), "the request did not finish"
        return self


def test_long_prompt_is_chunked_while_running_streams_keep_decoding(stories_model, ref):
    llm = _llm(stories_model)
    s = Scheduler(llm.engine, llm.tokenizer)
    try:
        log: list[str] = []
        a = Collector(log, "a")
        params = SamplingParams(temperature=0, max_tokens=450, ignore_eos=True)
        s.submit(llm.encode_prompt("Once upon a time"), params, a)
        while a.tokens < 3:
            time.sleep(0.001)
        long_prompt = llm.encode_prompt("The little dog ran to the park and " * 20)
        assert len(long_prompt) > 8 * llm.engine.ubatch
        b = Collector(log, "b")
        s.submit(long_prompt, GREEDY, b)
        a.wait(), b.wait()
        first_b = log.index("b")
        # while b's prompt went through in chunks of ubatch tokens, a got one token per chunk
        chunks = -(-len(long_prompt) // llm.engine.ubatch)
        assert log[:first_b].count("a") >= 3 + chunks - 1
        assert a.tokens == 450
        assert b.text == ref.generate(long_prompt, temperature=0, max_tokens=24).text
    finally:
        s.close()


def test_a_prompt_extending_a_finished_one_forks_its_blocks(stories_model, ref):
    llm = _llm(stories_model)
    s = Scheduler(llm.engine, llm.tokenizer)
    try:
        first = llm.encode_prompt("Once upon a time, there was a big red ball")
        one = Collector()
        s.submit(first, GREEDY, one)
        one.wait()
        extended = first + one.result.token_ids + llm.tokenizer.encode(" and", add_special=False)
        two = Collector()
        s.submit(extended, GREEDY, two)
        two.wait()
        assert two.result.stats.cached_tokens == len(first) + len(one.result.token_ids) - 1
        assert two.text == ref.generate(extended, temperature=0, max_tokens=24).text
        # the kept sequence was not changed by the fork's writes (copy-on-write)
        three = Collector()
        s.submit(first, GREEDY, three)
        three.wait()
        assert three.result.stats.cached_tokens == len(first) - 1
        assert three.text == one.text
    finally:
        s.close()


def test_the_prefix_cache_is_dropped_when_the_pool_needs_room(stories_model, ref):
    llm = _llm(stories_model, n_seq=1, n_ctx=256)
    s = Scheduler(llm.engine, llm.tokenizer)
    pool = llm.engine.pool
    try:
        one = Collector()
        s.submit(llm.encode_prompt("Once upon a time"), GREEDY.replace(max_tokens=150), one)
        one.wait()
        assert s.call(lambda: s.cache.blocks) > 0
        ids = llm.encode_prompt("The cat")
        fill = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        two = Collector()
        s.submit(ids, fill, two)
        two.wait()
        assert two.error is None and two.result.finish_reason == "context"
        # every position of the context was used (the last token sampled is not stored)
        assert len(ids) + len(two.result.token_ids) == 256 + 1
        want = ref.generate(ids, fill.replace(max_tokens=len(two.result.token_ids)))
        assert two.result.token_ids == want.token_ids
        s.clear_cache()
        assert s.call(lambda: pool.free_blocks) == pool.max_blocks - 1
    finally:
        s.close()


def test_a_failing_callback_or_a_cancel_touches_no_other_request(stories_model, ref):
    llm = _llm(stories_model)
    s = Scheduler(llm.engine, llm.tokenizer)
    try:

        def broken(event):
            raise RuntimeError("a callback bug")

        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        s.submit(llm.encode_prompt("One day"), long, broken)
        gone = s.submit(llm.encode_prompt("Lily"), long, Collector())
        ok = Collector()
        ids = llm.encode_prompt("The dog ran")
        s.submit(ids, GREEDY, ok)
        gone.cancel()
        ok.wait()
        assert ok.text == ref.generate(ids, GREEDY).text
        while s.n_running:
            time.sleep(0.001)
        assert s.cancelled == 2
        s.clear_cache()
        pool = llm.engine.pool
        assert s.call(lambda: pool.free_blocks) == pool.max_blocks - 1
    finally:
        s.close()


def test_a_request_held_back_for_blocks_runs_when_the_running_one_ends(stories_model):
    """Two usable KV blocks: a request that arrives while another runs waits for blocks, and is
    admitted once that one has finished (the loop used to sleep with it still waiting)."""
    llm = _llm(stories_model, n_seq=2, n_ctx=64)
    assert llm.engine.pool.max_blocks - 1 == 2
    s = Scheduler(llm.engine, llm.tokenizer)
    try:
        prompt = llm.encode_prompt("Once upon a time")
        a, b = Collector(), Collector()
        s.submit(prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), a)
        while a.tokens < 1:
            time.sleep(0.001)
        s.submit(prompt, GREEDY, b)
        assert a.wait().error is None and a.tokens == 48
        assert b.wait().error is None
        assert b.text == a.text[: len(b.text)]  # greedy: the same start
    finally:
        s.close()


def test_refusals(stories_model):
    llm = _llm(stories_model, n_seq=1, n_ctx=256)
    s = Scheduler(llm.engine, llm.tokenizer, max_queue=1)
    try:
        with pytest.raises(UsageError, match="256"):
            s.submit(list(range(1, 257)), GREEDY, Collector())
        with pytest.raises(UsageError, match="empty"):
            s.submit([], GREEDY, Collector())
        with pytest.raises(UsageError, match="vocabulary"):
            s.submit([10**6], GREEDY, Collector())
        long = SamplingParams(temperature=0, max_tokens=250, ignore_eos=True)
        with paused(s):  # the loop is held between iterations: requests queue
            h1 = s.submit([1, 2], long, Collector())
            with pytest.raises(QueueFull, match="retry later"):
                s.submit([1, 4], long, Collector())
            h1.cancel()
    finally:
        s.close()
    with pytest.raises(UsageError, match="max-queue"):
        Scheduler(llm.engine, llm.tokenizer, max_queue=0)

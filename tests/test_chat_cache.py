"""Chat keeps its KV cache between turns: each turn prefills only the tokens after the longest
common prefix with what the cache holds, and replies as a from-scratch run does (greedy)."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM
from kiln.runtime.engine import common_prefix

# stories260K has no chat template: a plain one whose generation prompt ("assistant:") is how
# the template writes an assistant turn, so that a reply is a prefix of the next render
TEMPLATE = (
    "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
QUESTIONS = ["Once upon a time", "What did Lily see?", "Then what?"]
GREEDY = {"temperature": 0, "max_tokens": 6}


def _load(stories_model, n_ctx: int = 256, **kw) -> LLM:
    return LLM(stories_model, device="cpu", n_ctx=n_ctx, verbose=False, **kw)


@pytest.fixture(scope="module")
def llm(stories_model) -> LLM:
    return _load(stories_model)


@pytest.fixture(scope="module")
def fresh(stories_model) -> LLM:
    return _load(stories_model)


class Prefills:
    """The number of tokens each engine.prefill call of an LLM processes."""

    def __init__(self, monkeypatch, llm: LLM):
        self.counts: list[int] = []
        prefill = llm.engine.prefill

        def spy(ids, cache, all_logits=False):
            self.counts.append(len(ids))
            return prefill(ids, cache, all_logits)

        monkeypatch.setattr(llm.engine, "prefill", spy)


def _from_scratch(fresh: LLM, messages, monkeypatch) -> list[int]:
    fresh.reset()
    seen = Prefills(monkeypatch, fresh)
    out = fresh.chat(messages, chat_template=TEMPLATE, **GREEDY)
    assert seen.counts == [len(fresh.encode_chat(messages, chat_template=TEMPLATE))]
    monkeypatch.undo()
    return out.token_ids


def _turn(llm: LLM, messages, monkeypatch):
    """One chat turn: (its prompt ids, what the cache held before, tokens prefilled, reply)."""
    ids = llm.encode_chat(messages, chat_template=TEMPLATE)
    held = list(llm.prompt_cache.ids)
    seen = Prefills(monkeypatch, llm)
    out = llm.chat(messages, chat_template=TEMPLATE, **GREEDY)
    monkeypatch.undo()
    return ids, held, sum(seen.counts), out


def _check_kept(llm: LLM, ids: list[int], out) -> None:
    """After a turn the cache holds the conversation so far: the prompt and the reply (all but
    a last sampled token that was never decoded)."""
    kept = llm.prompt_cache.ids
    assert kept == (ids + out.token_ids)[: len(kept)]
    assert len(kept) >= len(ids) + len(out.token_ids) - 1


def test_each_turn_prefills_only_its_new_tokens(llm, fresh, monkeypatch):
    llm.reset()
    messages: list[dict] = []
    previous: list[int] = []
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        ids, held, prefilled, out = _turn(llm, messages, monkeypatch)
        reused = min(common_prefix(held, ids), len(ids) - 1)
        assert prefilled == len(ids) - reused and out.stats.cached_tokens == reused
        if turn:  # the previous prompt and reply were all kept, not processed again
            assert reused > len(previous) and prefilled < len(ids) - len(previous)
        _check_kept(llm, ids, out)
        assert out.token_ids == _from_scratch(fresh, messages, monkeypatch)
        messages.append({"role": "assistant", "content": out.text})
        previous = ids


def test_a_changed_conversation_keeps_only_the_common_prefix(llm, fresh, monkeypatch):
    llm.reset()
    first = [{"role": "user", "content": "Once upon a time there was a dog"}]
    _turn(llm, first, monkeypatch)
    edited = [{"role": "user", "content": "Once upon a time there was a cat"}]
    ids, held, prefilled, out = _turn(llm, edited, monkeypatch)
    same = common_prefix(held, ids)
    assert 0 < same < len(ids) - 1 and prefilled == len(ids) - same
    assert out.token_ids == _from_scratch(fresh, edited, monkeypatch)
    # the same conversation again: everything is kept but its last token, run for the logits
    ids, _, prefilled, again = _turn(llm, edited, monkeypatch)
    assert prefilled == 1 and again.token_ids == out.token_ids


def test_reset_and_other_requests(llm, fresh, monkeypatch):
    llm.reset()
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    _, _, _, out = _turn(llm, messages, monkeypatch)
    messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": "Why?"}]
    # generate() and logits() between turns use caches of their own
    llm.generate("The dog", **GREEDY)
    llm.logits([1, 2, 3])
    ids, _, prefilled, out = _turn(llm, messages, monkeypatch)
    assert prefilled < len(ids) // 2
    assert out.token_ids == _from_scratch(fresh, messages, monkeypatch)
    llm.reset()
    assert llm.prompt_cache.ids == []
    ids, _, prefilled, again = _turn(llm, messages, monkeypatch)
    assert prefilled == len(ids) and again.token_ids == out.token_ids


def test_an_unread_stream_is_not_reused(llm, fresh, monkeypatch):
    llm.reset()
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    stream = llm.chat(messages, stream=True, chat_template=TEMPLATE, **GREEDY)
    next(stream)  # the cache is lent to this stream, which stops here
    ids, held, prefilled, out = _turn(llm, messages, monkeypatch)
    assert held == [] and prefilled == len(ids)
    assert out.token_ids == _from_scratch(fresh, messages, monkeypatch)
    stream.close()


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_kept_conversation_gives_way_when_the_pool_is_full(stories_model, monkeypatch, where):
    """The kept conversation holds blocks of the engine's KV pool. A pool of one sequence
    (n_seq=1) has no room for another request beside it: that request takes the blocks (the
    kept sequence is dropped, not corrupted) and the next turn starts over with the same reply.
    On the CPU the reference backend; on a GPU, the triton backend (f16 pool, CUDA graphs)."""
    if where == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")
        llm = LLM(stories_model, device="cuda", n_ctx=64, verbose=False, n_seq=1)
        assert llm.model.ops.name == "triton"
    else:
        llm = _load(stories_model, n_ctx=64, n_seq=1, backend="torch")
    messages = [{"role": "user", "content": "Tom"}]
    ids, _, prefilled, out = _turn(llm, messages, monkeypatch)
    assert prefilled == len(ids)
    _check_kept(llm, ids, out)
    messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": "Go"}]
    ids, held, prefilled, second = _turn(llm, messages, monkeypatch)
    reused = common_prefix(held, ids)
    assert reused > len(held) // 2 and prefilled == len(ids) - reused
    other = llm.engine.new_sequence()  # another request fills the pool: the kept one goes
    llm.engine.prefill([1] * 60, other)
    assert llm.prompt_cache.ids == []
    other.free()
    ids, _, prefilled, again = _turn(llm, messages, monkeypatch)
    assert prefilled == len(ids) and again.token_ids == second.token_ids

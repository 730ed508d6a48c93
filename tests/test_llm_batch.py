"""LLM.generate / LLM.chat over a list: one batch, results in input order, each with its own
sampling parameters and finish reason, equal to what each prompt gives alone (greedy and seeded
sampling alike: a row's draw depends on its seed and step only); prompts as token ids;
log-probabilities on request."""

from __future__ import annotations

import math

import pytest
import torch

from kiln import LLM
from kiln.errors import UsageError
from kiln.runtime.sampler import SamplingParams

PROMPTS = ["Once upon a time", "Tom had a dog", "The sun", "Lily and Ben went to the park"]


@pytest.fixture(scope="module")
def llm(stories_model) -> LLM:
    return LLM(stories_model, device="cpu", n_ctx=96, verbose=False, n_seq=3)


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0.9, seed=7, max_tokens=20, top_k=20),
        SamplingParams(temperature=1.2, seed=3, max_tokens=5, top_p=0.8, min_p=0.02),
        SamplingParams(temperature=0, max_tokens=16, stop=("the",), repeat_penalty=1.3),
    ]


def test_a_batch_gives_each_prompt_what_it_gets_alone(llm):
    """4 prompts with n_seq=3: a wave of 3, then 1; every row equals its lone run."""
    params = _params()
    batch = llm.generate(PROMPTS, params)
    alone = [llm.generate(p, q) for p, q in zip(PROMPTS, params)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in alone]
    assert batch[2].finish_reason == "length" and len(batch[2].token_ids) == 5
    assert all(r.stats.prompt_tokens > 0 for r in batch)


def test_one_params_for_all_and_options_apply_to_every_row(llm):
    outs = llm.generate(PROMPTS[:2], max_tokens=3, temperature=0)
    assert [len(o.token_ids) for o in outs] == [3, 3]
    with pytest.raises(UsageError, match="2 SamplingParams for 3 prompts"):
        llm.generate(PROMPTS[:3], _params()[:2])


def test_token_id_prompts(llm):
    ids = llm.tokenizer.encode(PROMPTS[0], add_special=True)
    from_ids = llm.generate(ids, max_tokens=6, temperature=0)
    assert from_ids.token_ids == llm.generate(PROMPTS[0], max_tokens=6, temperature=0).token_ids
    both = llm.generate([ids, PROMPTS[1]], max_tokens=6, temperature=0)
    assert both[0].token_ids == from_ids.token_ids
    with pytest.raises(UsageError, match="outside the vocabulary"):
        llm.generate([ids, [1, 10**6]], max_tokens=2)


def test_logprobs(llm):
    out = llm.generate(PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    assert len(out.logprobs) == 4
    ids = llm.tokenizer.encode(PROMPTS[0], add_special=True)
    logits = llm.logits(ids + out.token_ids[:1])
    want = torch.log_softmax(logits[len(ids) - 1].double(), -1)
    first = out.logprobs[0]
    assert first.token == out.token_ids[0]
    assert math.isclose(first.logprob, want[first.token].item(), abs_tol=1e-4)
    assert [t for t, _ in first.top] == torch.topk(want, 3).indices.tolist()
    assert llm.generate(PROMPTS[0], max_tokens=2).logprobs is None
    batch = llm.generate(PROMPTS[:2], max_tokens=3, temperature=0, logprobs=0)
    assert [len(o.logprobs) for o in batch] == [3, 3] and batch[0].logprobs[0].top == ()
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(UsageError, match="logprobs"):
            llm.generate(PROMPTS[0], logprobs=bad)


def test_chat_batch(llm):
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}assistant:"
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    outs = llm.chat(convs, chat_template=template, max_tokens=5, temperature=0)
    llm.reset()
    alone = [llm.chat(c, chat_template=template, max_tokens=5, temperature=0) for c in convs]
    llm.reset()
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    with pytest.raises(UsageError, match="one conversation"):
        llm.chat(convs, chat_template=template, stream=True)


def test_the_pool_is_free_after_a_batch(llm):
    free = llm.engine.pool.free_blocks
    llm.generate(PROMPTS, max_tokens=4, temperature=0)
    assert llm.engine.pool.free_blocks == free

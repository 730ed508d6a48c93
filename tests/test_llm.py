"""The Python API on the real models: generate, stream, chat, logits, and bad input."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM
from kiln.errors import KilnError, UnsupportedError, UsageError
from kiln.runtime.sampler import SamplingParams


@pytest.fixture(scope="module")
def stories(stories_model) -> LLM:
    return LLM(stories_model, device="cpu", n_ctx=128)


@pytest.fixture(scope="module")
def demo(demo_model) -> LLM:
    return LLM("smollm2-135m", device="cpu", n_ctx=512)


def test_generate_greedy(stories):
    out = stories.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=16))
    assert out.finish_reason == "length" and len(out.token_ids) == 16
    assert out.text.startswith(",") or out.text.startswith(" "), out.text
    assert out.stats.prompt_tokens > 0 and out.stats.generated_tokens == 16


def test_stream_equals_generate(stories):
    params = SamplingParams(temperature=0.9, max_tokens=24, seed=7)
    pieces = list(stories.stream("Lily saw a dog", params))
    assert "".join(pieces) == stories.generate("Lily saw a dog", params).text


def test_seed_reproducible_and_options_override(stories):
    a = stories.generate("The cat", temperature=1.0, max_tokens=20, seed=3).text
    b = stories.generate("The cat", temperature=1.0, max_tokens=20, seed=3).text
    c = stories.generate("The cat", temperature=1.0, max_tokens=20, seed=4).text
    assert a == b and a != c


def test_stop_string_cuts_the_text(stories):
    full = stories.generate("Once upon a time", temperature=0, max_tokens=30).text
    word = full.split()[3]
    out = stories.generate("Once upon a time", temperature=0, max_tokens=30, stop=[word])
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(word)]


def test_logits_match_generation(stories):
    ids = stories.tokenizer.encode("Once upon a time")
    logits = stories.logits(ids)
    assert logits.shape == (len(ids), stories.config.n_vocab)
    greedy = stories.generate("Once upon a time", temperature=0, max_tokens=1).token_ids[0]
    assert int(torch.argmax(logits[-1])) == greedy


def test_bad_input(stories):
    assert stories.generate("", max_tokens=2).token_ids  # from BOS (tests/test_inputs.py)
    with pytest.raises(UsageError, match="temperature"):
        stories.generate("hi", temperature=-1)
    with pytest.raises(UsageError, match="top_p"):
        stories.generate("hi", top_p=0)
    with pytest.raises(UsageError, match="unknown sampling option"):
        stories.generate("hi", temprature=1)
    with pytest.raises(UnsupportedError, match="chat template"):
        stories.chat([{"role": "user", "content": "hi"}])


def test_prompt_longer_than_context(stories):
    long = "the dog ran " * 100
    with pytest.raises(UsageError, match="context holds 128"):
        stories.generate(long)
    out = stories.generate(long, truncate=True, max_tokens=4, temperature=0)
    assert out.stats.prompt_tokens == 64 and len(out.token_ids) == 4


def test_generation_stops_at_the_end_of_the_context(stories_model):
    llm = LLM(stories_model, device="cpu", n_ctx=24)
    out = llm.generate("Once upon a time", temperature=0, max_tokens=100, ignore_eos=True)
    assert out.finish_reason == "context"
    assert out.stats.prompt_tokens + len(out.token_ids) == 25  # the last token is not stored


def test_unknown_model_and_device():
    with pytest.raises(KilnError, match="known model name"):
        LLM("not-a-model")
    with pytest.raises(UsageError, match="device"):
        LLM("smollm2-135m", device="tpu")


def test_demo_chat_answers_in_english(demo):
    out = demo.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in out.text
    assert out.finish_reason in ("eos", "length")


def test_demo_chat_stream(demo):
    messages = [{"role": "user", "content": "Say hello."}]
    pieces = list(demo.chat(messages, stream=True, temperature=0, max_tokens=12))
    assert "".join(pieces) == demo.chat(messages, temperature=0, max_tokens=12).text

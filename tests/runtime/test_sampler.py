"""Sampling: each truncation against a hand computation, seeds, penalties, bad values."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import UsageError
from kiln.runtime.sampler import Sampler, SamplingParams

# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in a shuffled vocabulary order, so that a truncation
# that works on sorted logits must map its result back to vocabulary order.
PROBS = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
LOGITS = torch.log(PROBS)
RANKED = [1, 3, 4, 0, 2]  # ids by falling probability


def _probs(**kw) -> torch.Tensor:
    params = SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})
    return Sampler(params).truncated_probs(LOGITS)


def _support(**kw) -> list[int]:
    return (_probs(**kw) > 0).nonzero().flatten().tolist()


def _top(n: int) -> list[int]:
    return sorted(RANKED[:n])


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS, []) == 1


def test_top_k():
    assert _support(top_k=2) == _top(2)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert _support(top_p=0.5) == _top(1)
    assert _support(top_p=0.6) == _top(2)
    assert _support(top_p=0.85) == _top(3)
    assert _support(top_p=0.86) == _top(4)


def test_min_p_is_relative_to_the_top_probability():
    assert _support(min_p=0.3) == _top(3)  # 0.15 >= 0.3 * 0.5
    assert _support(min_p=0.5) == _top(1)


def test_temperature_sharpens():
    probs = _probs(temperature=0.5)
    expected = torch.softmax(LOGITS / 0.5, -1)
    torch.testing.assert_close(probs, expected)


# Each truncation with a temperature other than 1: llama.cpp's chain truncates on the untempered
# distribution and applies the temperature to what is left. Tempering first would change what
# top-p and min-p keep (at T = 2 the probabilities flatten to 0.34, 0.21, 0.19, 0.15, 0.11: top-p
# 0.6 would keep 3 tokens, min-p 0.3 all 5; at T = 0.5 they sharpen to 0.77, 0.12, 0.07, ...:
# top-p 0.85 would keep 2).
@pytest.mark.parametrize("temperature", (0.5, 2.0))
@pytest.mark.parametrize(
    ("kw", "kept"),
    [
        ({"top_k": 2}, 2),
        ({"top_k": 3}, 3),
        ({"top_p": 0.6}, 2),
        ({"top_p": 0.85}, 3),
        ({"min_p": 0.3}, 3),
        ({"min_p": 0.45}, 1),
        ({"top_k": 4, "top_p": 0.6, "min_p": 0.3}, 2),
    ],
)
def test_truncation_then_temperature(kw, kept, temperature):
    probs = _probs(temperature=temperature, **kw)
    support = _top(kept)
    assert (probs > 0).nonzero().flatten().tolist() == support
    expected = torch.zeros_like(probs)
    expected[support] = torch.softmax(LOGITS[support] / temperature, -1)
    torch.testing.assert_close(probs, expected)


def test_same_seed_same_tokens():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(params)(logits, []) for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    assert [s1(logits, []) for _ in range(20)] == [s2(logits, []) for _ in range(20)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed draws the same first token
    s3 = Sampler(params.replace(seed=43))
    assert [s3(logits, []) for _ in range(20)] != [Sampler(params)(logits, []) for _ in range(20)]


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    params = SamplingParams(
        repeat_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5, repeat_last_n=3
    )
    out = Sampler(params).penalize(logits, history=[3, 0, 1, 1])  # last 3: 0, 1, 1
    expected = torch.tensor([2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 1.0 - 0.25, 0.5, 0.0])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"min_p": -1}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_values(kw, words):
    with pytest.raises(UsageError) as info:
        SamplingParams(**kw)
    assert words in str(info.value)


def test_unknown_option():
    with pytest.raises(UsageError, match="unknown sampling option"):
        SamplingParams().replace(temprature=0.5)

"""Sampling: each truncation against a hand computation, seeds, penalties, bad values; the batch:
each row as alone, the draw's distribution and generator, log-probabilities, one transfer."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.errors import ModelOutputError, UsageError
from kiln.runtime import sampler as sampler_module
from kiln.runtime.sampler import SEED_MAX, Choice, Sampler, SamplingParams, sample_batch

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


def test_top_p_is_compared_in_float32():
    # m: the float32 mass above the third-ranked token; a top_p just above m that rounds to m in
    # float32 drops that token (as before the batched sampler: torch compared the float32 sums
    # with top_p rounded to float32); a float64 comparison would keep it
    ranked = torch.softmax(LOGITS[RANKED], -1)
    m = (torch.cumsum(ranked, -1) - ranked)[2].item()
    ulp = 2.0 ** (math.frexp(m)[1] - 24)  # float32's spacing at m
    top_p = m + ulp / 4
    assert torch.tensor(top_p, dtype=torch.float32).item() == m < top_p
    assert _support(top_p=top_p) == _top(2)
    assert _support(top_p=m + ulp) == _top(3)  # a float32 step above: kept


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


# --------------------------------------------------------------------------------------------
# the batch: every row with its own parameters, on the logits' device, one transfer per step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 300  # vocabulary of the batch tests


def test_uniform_is_splitmix64():
    # SplitMix64 seeded with 0 (Steele et al.'s reference code; xoshiro's seeding): its first
    # outputs are 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F; mix64(0) = 0
    for step, out in enumerate((0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F)):
        assert sampler_module.uniform(0, step) == (out >> 11) * 2.0**-53
    values = [sampler_module.uniform(seed, step) for seed in range(100) for step in range(100)]
    assert all(0 <= u < 1 and (u * 2**53).is_integer() for u in values)  # 53 bits
    counts = torch.bincount((torch.tensor(values) * 20).long(), minlength=20).double()
    chi2 = ((counts - 500) ** 2 / 500).sum().item()
    assert chi2 < 43.82, chi2  # the 0.999 quantile of chi-square with 19 degrees of freedom
    assert sampler_module.uniform(2**64 - 1, 0) != sampler_module.uniform(0, 0)


# Mixed rows: greedy (with and without penalties), top-k, top-p, min-p, penalties over different
# windows, temperatures from 1e-3 to 2, a top_k above the vocabulary (off), seeds.
CONFIGS = [
    SamplingParams(temperature=0, seed=1),
    SamplingParams(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, seed=2),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=3),
    SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.1, seed=4),
    SamplingParams(
        repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, repeat_last_n=16, seed=5
    ),
    SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=8, seed=6),
    SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=7),
    SamplingParams(temperature=1e-3, top_k=V + 100, top_p=0.99, repeat_penalty=0.7, seed=8),
]
ROWS = {1: [4], 2: [1, 5], 3: [6, 2, 0], 8: [3, 7, 0, 5, 1, 6, 2, 4]}
STEPS = 50


def _step_logits(config: int, step: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * config + step)
    return (torch.randn(V, generator=g) * 3).to(device)


def _prompt(config: int) -> list[int]:
    return torch.randint(V, (12,), generator=torch.Generator().manual_seed(config)).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", sorted(ROWS))
def test_a_row_gets_the_same_tokens_in_a_batch_as_alone(batch, device):
    rows = ROWS[batch]
    alone = {}
    for c in rows:
        sampler, history = Sampler(CONFIGS[c]), _prompt(c)
        for step in range(STEPS):
            history.append(sampler(_step_logits(c, step, device), history))
        alone[c] = history[12:]
    samplers = [Sampler(CONFIGS[c]) for c in rows]
    histories = [_prompt(c) for c in rows]
    for step in range(STEPS):
        logits = torch.stack([_step_logits(c, step, device) for c in rows])
        choices = sample_batch(logits, samplers, histories)
        for history, choice in zip(histories, choices):
            history.append(choice.token)
    for c, history in zip(rows, histories):
        assert history[12:] == alone[c], c
    sampled = [c for c in rows if not CONFIGS[c].greedy and CONFIGS[c].temperature > 0.01]
    assert all(len(set(alone[c])) > 5 for c in sampled)  # the draws are not all one token


def _chi2_quantile_999(df: int) -> float:
    """The 0.999 quantile of chi-square with df degrees of freedom (tables)."""
    return {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}[df]


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7, "top_k": 6, "top_p": 0.9, "min_p": 0.1},
        {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.2},
    ],
)
def test_draws_follow_the_truncated_probabilities(kw):
    # 50 seeds x 200 steps: the counter's two coordinates; the frequencies against the
    # truncated distribution by chi-square at the 0.999 level (deterministic seeds)
    probs = torch.tensor([0.3, 0.02, 0.25, 0.15, 0.1, 0.08, 0.05, 0.05])
    params = [SamplingParams(seed=seed, **kw) for seed in range(50)]
    expected = sampler_module.truncated_probs(torch.log(probs)[None], params[:1])[0]
    samplers = [Sampler(p) for p in params]
    logits = torch.log(probs).expand(len(samplers), -1)
    counts = torch.zeros(8)
    for _ in range(200):
        tokens = [c.token for c in sample_batch(logits, samplers, [[]] * len(samplers))]
        counts += torch.bincount(torch.tensor(tokens), minlength=8)
    kept = expected > 0
    assert 2 <= kept.sum() < 8 and counts[~kept].sum() == 0  # zero probability: never drawn
    n = counts.sum()
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum().item()
    assert chi2 < _chi2_quantile_999(int(kept.sum()) - 1), (chi2, counts, expected)


def test_different_seeds_give_different_streams():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(5)).expand(8, -1)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    samplers = [
        Sampler(params.replace(seed=seed)) for seed in (0, 1, 2, 3, 42, 43, 2**63, SEED_MAX)
    ]
    streams = [[] for _ in samplers]
    for _ in range(30):
        for stream, choice in zip(streams, sample_batch(logits, samplers, [[]] * 8)):
            stream.append(choice.token)
    assert len({tuple(s) for s in streams}) == 8
    # and the same seed, the same stream whatever its place in the batch
    again = [Sampler(params.replace(seed=seed)) for seed in (43, 0)]
    first = [c.token for c in sample_batch(logits[:2], again, [[]] * 2)]
    assert first == [streams[5][0], streams[0][0]]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_probability_tokens_are_never_drawn_at_the_ends_of_u(monkeypatch, device):
    # top-3 of 6 keeps ids 1, 3, 4: in vocabulary order the first kept is 1, the last 4; the
    # truncated ids 0, 2 and 5 lie before, between and after them
    logits = torch.tensor([-5.0, 2.0, -4.0, 1.0, 3.0, -6.0], device=device)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    for u, token in ((0.0, 1), (1 - 2.0**-53, 4), (0.5, 4)):
        monkeypatch.setattr(sampler_module, "uniform", lambda seed, step, u=u: u)
        assert Sampler(params)(logits, []) == token, u
    # float64 sums that a tiny probability does not change: that token cannot be the first to
    # pass the target either
    probs = torch.tensor([[0.0, 1e-300, 0.0, 1.0, 1e-20, 0.0]] * 3, dtype=torch.float64)
    u = torch.tensor([[0.0], [0.5], [1 - 2.0**-53]], dtype=torch.float64)
    assert sampler_module._draw(probs.to(device), u.to(device)).tolist() == [1, 3, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_log_softmax_of_the_penalized_logits(device):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)).to(device) * 4
    params = [
        SamplingParams(temperature=0, repeat_penalty=1.5, presence_penalty=1.0, seed=1),
        SamplingParams(temperature=0.9, seed=2),
        SamplingParams(temperature=1.2, top_k=3, frequency_penalty=2.0, seed=3),
    ]
    histories = [[1, 2, 3, 3], [4], [7, 7, 8]]
    plain = sample_batch(logits, [Sampler(p) for p in params], histories)
    got = sample_batch(logits, [Sampler(p) for p in params], histories, logprobs=[None, 0, 5])
    assert [c.token for c in got] == [c.token for c in plain]  # asking changes no token
    assert got[0] == Choice(plain[0].token) and got[1].top == ()
    for row in (1, 2):
        penalized = Sampler(params[row]).penalize(logits[row], histories[row])
        expected = torch.log_softmax(penalized, -1).cpu()
        assert abs(got[row].logprob - expected[got[row].token].item()) < 1e-6
    ids, values = zip(*got[2].top)
    assert list(values) == sorted(values, reverse=True)
    top = torch.topk(expected, 5)
    assert list(ids) == top.indices.tolist()
    torch.testing.assert_close(
        torch.tensor(values, dtype=torch.float64), top.values.double(), atol=1e-6, rtol=0
    )
    everything = sample_batch(logits[:1], [Sampler(params[0])], histories[:1], logprobs=[999])
    assert len(everything[0].top) == 50  # more than the vocabulary: all of it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_nan_or_inf_raises_and_nothing_advances(device, bad):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(device)
    params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate((0.0, 0.8, 1.0))]
    samplers, reference = [Sampler(p) for p in params], [Sampler(p) for p in params]
    for _ in range(2):
        sample_batch(logits, samplers, [[]] * 3)
        sample_batch(logits, reference, [[]] * 3)
    broken = logits.clone()
    broken[1, 5] = bad
    with pytest.raises(ModelOutputError, match="NaN or infinite values .at generated token 3") as e:
        sample_batch(broken, samplers, [[]] * 3, logprobs=[2, None, 0])
    assert e.value.rows == [1]
    assert [s.steps for s in samplers] == [2, 2, 2]
    # the failed step used up nothing: the next one draws what the third step draws
    assert sample_batch(logits, samplers, [[]] * 3) == sample_batch(logits, reference, [[]] * 3)


def test_one_transfer_per_step(monkeypatch):
    calls = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__iter__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(4))
    samplers = [Sampler(CONFIGS[c]) for c in range(8)]
    histories = [_prompt(c) for c in range(8)]
    for logprobs in (None, [3, None, 0, 1, None, 5, 2, 0]):
        calls.clear()
        sample_batch(logits, samplers, histories, logprobs)
        assert calls == ["tolist"], logprobs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device")
def test_one_host_sync_per_step_on_cuda():
    import warnings

    logits = torch.randn(8, V, device="cuda")
    samplers = [Sampler(CONFIGS[c]) for c in range(8)]
    histories = [_prompt(c) for c in range(8)]
    sample_batch(logits, samplers, histories, [3] * 8)  # warm up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            sample_batch(logits, samplers, histories, [3] * 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in seen if "synchroniz" in str(w.message)]) == 1, [
        str(w.message) for w in seen
    ]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_work_does_not_grow_with_the_batch():
    # every stage runs once for all rows: the same torch calls for 1, 3 or 8 rows (no loop over
    # rows on the device), and not hundreds of them
    params = SamplingParams(repeat_penalty=1.2, frequency_penalty=0.1, top_k=20, seed=0)
    counts = []
    for batch in (1, 3, 8):
        logits = torch.randn(batch, 2000, generator=torch.Generator().manual_seed(batch))
        samplers = [Sampler(params.replace(seed=i)) for i in range(batch)]
        histories = [list(range(i, i + 30)) for i in range(batch)]
        with _CountOps() as ops:
            sample_batch(logits, samplers, histories, logprobs=[4] * batch)
        counts.append(ops.n)
    assert counts[0] == counts[1] == counts[2] and counts[0] < 100, counts


def test_batched_penalties_against_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [1.5, 2.0, -0.5, 0.25, -2.0]] * 2)
    params = [
        SamplingParams(
            repeat_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5, repeat_last_n=3
        ),
        SamplingParams(repeat_penalty=1.5, repeat_last_n=64),  # one id: padded to the others'
        SamplingParams(),  # no penalty: padded with neutral values
        SamplingParams(presence_penalty=1.0, repeat_last_n=0),  # window 0: off
    ]
    histories = [[3, 0, 1, 1], [3], [2, 2], [1]]
    step = sampler_module._Step(params, histories, [0.0] * 4, 5, logits.device)
    out = sampler_module._penalize(logits, step)
    expected = logits.clone()
    expected[0, 0] = 2.0 / 2 - 0.5 - 0.25  # the last 3: 0, 1, 1
    expected[0, 1] = -1.0 * 2 - 2 * 0.5 - 0.25
    expected[1, 3] = 0.25 / 1.5
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_rows_with_a_stage_off_are_untouched_by_rows_with_it_on():
    # [20, 0, 0, 0]: float32 gives the top token probability 1.0, so the mass above each other
    # token is already 1.0; a row with top_p = 1 (off) still keeps them
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0]] * 3)
    off = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    params = [
        off,
        off.replace(top_p=0.5),
        off.replace(top_k=4),  # = n_vocab: off
        off.replace(top_k=2),
        off,
        off.replace(min_p=0.3),
    ]
    batch = sampler_module.truncated_probs(logits, params)
    assert (batch[0] > 0).all() and (batch[4] > 0).all() and (batch[2] > 0).all()
    for row, p in enumerate(params):
        alone = sampler_module.truncated_probs(logits[row : row + 1], [p])[0]
        assert torch.equal(batch[row], alone), row
    assert (batch[[1, 3, 5]] > 0).sum(-1).tolist() == [1, 2, 2]


@pytest.mark.parametrize(("rows", "width"), [(1, 10), (1, 5000), (3, 700), (8, 151936)])
def test_padded_cumsum_is_the_cumsum(rows, width):
    # what CUDA runs for batch invariance (_cumsum's docstring): the sums of the padded table
    x = torch.rand(rows, width, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    sums = sampler_module._padded_cumsum(x)
    assert sums.is_contiguous()  # searchsorted copies (and warns) otherwise
    torch.testing.assert_close(sums, torch.cumsum(x, -1), atol=0, rtol=0)


def test_bad_batch_arguments():
    logits = torch.randn(2, 10)
    a, b = Sampler(SamplingParams()), Sampler(SamplingParams())
    with pytest.raises(ValueError, match="once in a batch"):
        sample_batch(logits, [a, a], [[], []])
    with pytest.raises(ValueError, match="logits"):
        sample_batch(logits, [a], [[]])
    with pytest.raises(ValueError, match="logprobs has 1 entries"):
        sample_batch(logits, [a, b], [[], []], logprobs=[1])
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="logprobs must be None or an integer"):
            sample_batch(logits, [a, b], [[], []], logprobs=[bad, None])
    penalized = Sampler(SamplingParams(repeat_penalty=1.1))
    for token in (10, -1):  # outside 0..9: refused before any device work
        with pytest.raises(UsageError, match=f"token id {token} in the history is outside"):
            sample_batch(logits, [a, penalized], [[1], [2, token]])
    assert sample_batch(logits[:0], [], []) == []
    assert a.steps == b.steps == penalized.steps == 0

"""Token selection for a batch of rows on the logits' device, each row with its own
SamplingParams: greedy, or penalties -> top-k -> top-p -> min-p -> temperature -> draw, the order
of llama.cpp's default sampler chain. Seeded: a row's draw depends only on its seed, its step
count and its logits (a counter-based generator), so a sequence gets the same tokens alone or in
any batch. Only the chosen ids (and log-probabilities when asked) come back to the host, in one
transfer per step."""

from __future__ import annotations

import math
import numbers
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from kiln.errors import ModelOutputError, UsageError
from kiln.runtime.batch import to_device

SEED_MAX = 2**64 - 1  # the draw's generator takes 64-bit seeds (llama.cpp's --seed is 32-bit)


@dataclass(frozen=True)
class SamplingParams:
    """Every value is checked here, once, for the CLI and the API alike: a wrong type, NaN, an
    infinity or a value out of range is a UsageError that names the field."""

    max_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; >1 discourages tokens of the last repeat_last_n
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None (or -1, as in llama.cpp): a random seed; else 0..2**64-1
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise UsageError(f"stop must be a string or a list of strings, got {stop!r}")
        _check(all(s for s in stop), "stop strings must not be empty")
        put("stop", tuple(stop))
        put("max_tokens", _integer("max_tokens", self.max_tokens, 0, ">= 0"))
        put("temperature", _real("temperature", self.temperature, ">= 0 (0 = greedy)", 0))
        put("top_k", _integer("top_k", self.top_k, 0, ">= 0 (0 turns it off)"))
        put("top_p", _real("top_p", self.top_p, "in (0, 1] (1 = off)", 0, 1, low_open=True))
        put("min_p", _real("min_p", self.min_p, "in [0, 1] (0 = off)", 0, 1))
        put(
            "repeat_penalty",
            _real("repeat_penalty", self.repeat_penalty, "> 0 (1 = off)", 0, low_open=True),
        )
        put("repeat_last_n", _integer("repeat_last_n", self.repeat_last_n, 0, ">= 0"))
        put("presence_penalty", _real("presence_penalty", self.presence_penalty, "(0 = off)"))
        put("frequency_penalty", _real("frequency_penalty", self.frequency_penalty, "(0 = off)"))
        if self.seed is not None:
            seed = _integer("seed", self.seed, -1, f"in 0..{SEED_MAX} (or -1: random)")
            _check(seed <= SEED_MAX, f"seed must be in 0..{SEED_MAX} (or -1: random), got {seed}")
            put("seed", None if seed == -1 else seed)
        if not isinstance(self.ignore_eos, bool):
            raise UsageError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    def replace(self, **changes) -> SamplingParams:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UsageError(
                f"unknown sampling option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        """Whether a penalty applies: the selection then reads the history's last tokens."""
        return bool(self.repeat_last_n) and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _integer(name: str, value, minimum: int, rule: str) -> int:
    """An int (numpy ints too; not a bool, a float or a string) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name} must be an integer {rule}, got {value!r}")
    _check(int(value) >= minimum, f"{name} must be {rule}, got {int(value)}")
    return int(value)


def _real(
    name: str,
    value,
    rule: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real number (int or float, not a bool or a string) in [low, high] ((low, high]
    with low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number {rule}, got {value!r}")
    x = float(value)
    _check(math.isfinite(x), f"{name} must be a finite number {rule}, got {x}")
    too_low = low is not None and (x <= low if low_open else x < low)
    _check(not too_low and (high is None or x <= high), f"{name} must be {rule}, got {x}")
    return x


# -- the draw's random numbers -------------------------------------------------------------------
# A counter-based generator: the uniform of a row's step is a pure function of (seed, step), so
# it cannot depend on the other rows, the batch size or the device. SplitMix64 (Steele, Lea and
# Flood, 2014; BigCrush-clean) started at mix64(seed): its step-th output, the top 53 bits as a
# float64 in [0, 1) (every float64 multiple of 2**-53 there; float32's 24 bits would leave draws
# of probability below 2**-24 at the mercy of rounding). Computed on the host with Python's exact
# integers (torch has no unsigned 64-bit multiply on every device, and signed overflow is not
# defined behaviour in its kernels); the value travels to the device in the step's one table.

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2**64 / the golden ratio, odd


def _mix64(z: int) -> int:
    """SplitMix64's output function (Stafford's Mix13): a bijection of 64-bit integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, step: int) -> float:
    """The uniform in [0, 1) of draw number `step` (0, 1, ...) of the stream `seed` (0..2**64-1):
    53 random bits."""
    return (_mix64((_mix64(seed) + (step + 1) * _GOLDEN) & _MASK64) >> 11) * 2.0**-53


# -- one step's per-row values, built on the host ------------------------------------------------

_TEMPERATURE, _KTH, _KTH_OFF, _TOP_P, _MIN_P, _REPEAT, _PRESENCE, _FREQUENCY, _U = range(9)
_COLUMNS = 9  # then the recent ids (L columns) and their counts (L columns)


class _Step:
    """The rows' parameters, each row's uniform and the recent tokens each row penalizes, in one
    float64 table [B, 9 + 2 L] sent to the device in one copy (ids and counts are exact in
    float64), with what the host knows about the batch (which stages any row needs)."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        histories: Sequence[Sequence[int]],
        uniforms: Sequence[float],
        n_vocab: int,
        device: torch.device,
    ):
        inf = float("inf")
        recents = [_recent_counts(p, h, n_vocab) for p, h in zip(params, histories)]
        self.recent = max((len(c) for c in recents), default=0)  # L
        self.greedy = [p.greedy for p in params]
        self.top_k = 0  # the largest top-k any sampled row applies (0: none)
        self.top_p = self.min_p = False  # whether any sampled row applies it
        rows = []
        for p, counts, u in zip(params, recents, uniforms):
            # truncation off: top-k 0, top-p threshold inf (a cumulative sum that rounds up to
            # 1.0 must not drop a row's tail when its top_p is 1), min-p 0; greedy rows skip it
            top_k = p.top_k if 0 < p.top_k < n_vocab and not p.greedy else 0
            # top_p rounded to float32 as the float32 sums it is compared with (exactly, in float64)
            top_p = _float32(p.top_p) if p.top_p < 1.0 and not p.greedy else inf
            min_p = p.min_p if not p.greedy else 0.0
            self.top_k = max(self.top_k, top_k)
            self.top_p |= top_p != inf
            self.min_p |= min_p > 0
            # top-k: the k-th largest logit, at index k - 1 of the sorted row; + -inf when off
            row = [p.temperature, max(top_k - 1, 0), 0.0 if top_k else -inf, top_p, min_p]
            if counts:
                row += [p.repeat_penalty, p.presence_penalty, p.frequency_penalty, u]
                ids, n = list(counts), list(counts.values())
                # padded with copies of the row's first (id, count): the scatter then writes
                # the same value twice, never a penalty onto a token outside the window
                pad = self.recent - len(ids)
                row += ids + ids[:1] * pad + n + n[:1] * pad
            else:  # padded with token 0 under neutral penalties: its value written back as is
                row += [1.0, 0.0, 0.0, u] + [0] * (2 * self.recent)
            rows.append(row)
        self._rows, self._device, self._table = rows, device, None

    @property
    def table(self) -> torch.Tensor:
        """The rows on the device, sent at the first use: a batch of greedy rows without
        penalties reads none of it (argmax only), and then saves the copy."""
        if self._table is None:
            self._table = to_device(self._rows, torch.float64, self._device)
        return self._table

    def column(self, i: int) -> torch.Tensor:
        """[B, 1]"""
        return self.table[:, i : i + 1]

    def ids(self) -> torch.Tensor:
        return self.table[:, _COLUMNS : _COLUMNS + self.recent].long()

    def counts(self) -> torch.Tensor:
        return self.table[:, _COLUMNS + self.recent :]


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (x in [0, 1])."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _recent_counts(p: SamplingParams, history: Sequence[int], n_vocab: int) -> Counter:
    """The tokens of the last repeat_last_n of the history and how often each occurs; empty when
    every penalty is off."""
    if not p.penalizes:
        return Counter()
    counts = Counter(history[-p.repeat_last_n :])
    if counts and (min(counts) < 0 or max(counts) >= n_vocab):
        bad = min(counts) if min(counts) < 0 else max(counts)
        raise UsageError(
            f"token id {bad} in the history is outside the model's vocabulary (0..{n_vocab - 1})"
        )
    return counts


# -- the stages, on the device, every row at once ------------------------------------------------


def _penalize(logits: torch.Tensor, step: _Step) -> torch.Tensor:
    """llama.cpp's repeat, frequency and presence penalties over each row's recent tokens: one
    gather and one scatter over the padded [B, L] ids."""
    if not step.recent:
        return logits
    ids = step.ids()
    # float64, then clamped to float32's range: extreme (finite) penalties such as 1e300
    # give -inf/+inf in float32 arithmetic, and inf - inf = NaN
    sel = logits.gather(1, ids).double()
    repeat = step.column(_REPEAT)
    sel = torch.where(sel > 0, sel / repeat, sel * repeat)
    sel = sel - step.counts() * step.column(_FREQUENCY) - step.column(_PRESENCE)
    big = torch.finfo(torch.float32).max
    return logits.scatter(1, ids, sel.clamp(-big, big).float())


def _truncated_probs(logits: torch.Tensor, step: _Step) -> torch.Tensor:
    """float64 probabilities [B, V] after top-k, top-p, min-p and temperature (zeros elsewhere);
    each stage runs only when some row applies it, and leaves the other rows as they are."""
    inf = float("-inf")
    if step.top_p:
        # stable: tied logits keep vocabulary order, so a row's result never depends on the
        # sort's algorithm (which may change with the batch size)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    if step.top_k:
        top = sorted_logits if step.top_p else torch.topk(logits, step.top_k, dim=-1).values
        kth = top.gather(1, step.column(_KTH).long()) + step.column(_KTH_OFF)  # -inf: off
        logits = logits.masked_fill(logits < kth, inf)
        if step.top_p:  # the same values as sorting the masked logits
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, inf)
    if step.top_p:
        probs = torch.softmax(sorted_logits, -1)
        before = _cumsum(probs) - probs  # mass of the tokens ranked above
        drop = before >= step.column(_TOP_P)  # keep the smallest prefix reaching top_p
        drop[:, 0] = False  # the top token always stays (a top_p below float32's range is 0)
        # scattered back to vocabulary order as a mask: no host round trip
        drop = torch.empty_like(drop).scatter_(1, order, drop)  # order: a permutation
        logits = logits.masked_fill(drop, inf)
    if step.min_p:
        probs = torch.softmax(logits, -1)
        floor = step.column(_MIN_P).float() * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, inf)
    # The temperature divides (logits - max) <= 0 in float64: a tiny temperature (1e-45,
    # below float32's range) gives 0 for the top token and -inf for the rest (greedy)
    # instead of inf/inf = NaN, and a huge one (1e300) gives a flat distribution. The top
    # tokens (difference 0) are set to 0 apart: CUDA divides by multiplying with 1/t, which
    # is inf for a denormal t (5e-324), and 0 * inf = NaN (seen on an H100; that was a scalar
    # divisor, here it is a tensor, but the rule stays: 0 / t is 0 whatever the division does).
    diff = (logits - logits.amax(-1, keepdim=True)).double()
    scaled = torch.where(diff < 0, diff / step.column(_TEMPERATURE), 0.0)
    return torch.softmax(scaled, -1)


def _cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along the rows of x [B, V], each row's sums the same in any batch. On CUDA,
    torch's scan takes CUB for a single row and otherwise picks the threads per row from the row
    count and length (aten/src/ATen/native/cuda/ScanUtils.cuh: log2 threads = (9 + ceil(log2 V)
    - ceil(log2 rows)) // 2, at most 9), which changes the order of the additions; with >= 2 rows
    of >= 512 << ceil(log2 rows) elements every row gets 512 threads. Zeros padded on the right
    and below change no sum on the left. For V = 151936 that is a copy only when B = 1. On the
    CPU each row is summed in order."""
    return _padded_cumsum(x) if x.device.type == "cuda" else torch.cumsum(x, -1)


def _padded_cumsum(x: torch.Tensor) -> torch.Tensor:
    n_rows, width = x.shape
    rows = max(n_rows, 2)
    columns = max(width, 512 << (rows - 1).bit_length())
    if (rows, columns) == (n_rows, width):
        return torch.cumsum(x, -1)
    padded = x.new_zeros(rows, columns)
    padded[:n_rows, :width] = x
    return torch.cumsum(padded, -1)[:n_rows, :width].contiguous()  # searchsorted wants it


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF selection: per row, the first index whose float64 cumulative sum exceeds
    u * total (u [B, 1] in [0, 1)). Only a token of probability > 0 can be chosen: where p = 0 the
    sum does not grow, so it cannot be the first to pass the target. u * total < total for u <=
    1 - 2**-53 and a normal total (about 1 here), so the index is always < V; the clamp only
    guards the memory access."""
    cdf = _cumsum(probs)
    target = u * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_(max=probs.shape[-1] - 1)[:, 0]


def _select(logits: torch.Tensor, step: _Step) -> torch.Tensor:
    """Token ids [B]: the argmax of the penalized logits for greedy rows, a draw for the rest."""
    if all(step.greedy):
        return logits.argmax(-1)
    drawn = _draw(_truncated_probs(logits, step), step.column(_U))
    if not any(step.greedy):
        return drawn
    return torch.where(step.column(_TEMPERATURE)[:, 0] == 0, logits.argmax(-1), drawn)


# -- the API -------------------------------------------------------------------------------------


class Sampler:
    """One sequence's selection: its parameters, its seed and its step count (the position in the
    seed's stream). Calling it samples a batch of one; sample_batch samples many."""

    def __init__(self, params: SamplingParams):
        self.params = params
        # not torch.seed(): that would reseed the caller's global torch generator
        seed = params.seed
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self.steps = 0  # tokens selected so far

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: [n_vocab] -> the next token id. Logits with a NaN or an infinity raise a
        ModelOutputError; the test runs on the device and comes back with the token id (one
        host sync per token)."""
        if logits.dim() != 1:
            raise ValueError(f"Sampler takes logits [n_vocab], got {tuple(logits.shape)}")
        return sample_batch(logits.unsqueeze(0), [self], [history])[0].token

    def penalize(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """logits [n_vocab] after this sampler's penalties for history."""
        row = logits.float().unsqueeze(0)
        step = _Step([self.params], [history], [0.0], row.shape[-1], row.device)
        return _penalize(row, step)[0]

    def truncated_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities [n_vocab] (float32) after top-k, top-p, min-p and temperature (zeros
        elsewhere)."""
        return truncated_probs(logits.unsqueeze(0), [self.params])[0].float()


@dataclass(frozen=True, slots=True)
class Choice:
    """One row's selection."""

    token: int
    logprob: float | None = None  # the token's log-probability, when logprobs were asked
    top: tuple[tuple[int, float], ...] = ()  # the top-n (id, log-probability), best first


def truncated_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """float64 probabilities [B, n_vocab] of logits [B, n_vocab] after each row's top-k, top-p,
    min-p and temperature (no penalties: those need a history)."""
    logits = logits.float()
    step = _Step(params, [()] * len(params), [0.0] * len(params), logits.shape[-1], logits.device)
    return _truncated_probs(logits, step)


def sample_batch(
    logits: torch.Tensor,
    samplers: Sequence[Sampler],
    histories: Sequence[Sequence[int]],
    logprobs: Sequence[int | None] | None = None,
) -> list[Choice]:
    """One token for each row of logits [B, n_vocab], row i with samplers[i] and the token ids
    so far histories[i] (prompt and reply: the penalties read its last repeat_last_n).
    logprobs[i] = n (or None: none) asks for row i's log-probabilities: the chosen token's and
    the n best (n = 0: the chosen token's only; more than n_vocab: all), from the log_softmax of
    the penalized logits, before truncation and temperature (vLLM's default).

    Every stage runs once for the whole batch on the logits' device; the results come back in
    one device -> host transfer. A row with a NaN or an infinity raises a ModelOutputError after
    it (naming the first such row's generated token number; `error.rows` lists the bad rows) and
    no row is returned or advances its step count."""
    pending = launch_batch(logits, samplers, histories, logprobs)
    choices = pending.collect()
    bad = [i for i, c in enumerate(choices) if c is None]
    if bad:
        error = pending.error(bad)
        for s in samplers:
            s.steps -= 1
        raise error
    return choices


class PendingChoices:
    """A batch's selections launched on the device and not yet read (launch_batch): `token`
    holds the chosen ids on the device (-1 for a row whose logits were not finite), so that the
    next decode step can be launched with them before the host has seen them; collect() brings
    them back (the copy into pinned memory was queued at launch: on a GPU the host waits only
    for the step to end)."""

    def __init__(self, samplers, asked, token: torch.Tensor, out: torch.Tensor):
        self.samplers, self.asked, self.token = samplers, asked, token
        self.steps = [s.steps + 1 for s in samplers]  # each row's token number (1 = first)
        self._event = None
        if out.device.type == "cuda":
            self._host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self._host.copy_(out, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = out

    def collect(self) -> list[Choice | None]:
        """The rows' Choices; None for a row whose logits held a NaN or an infinity."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._host.tolist()  # the one transfer's values
        return [None if row[0] < 0 else _choice(row, n) for row, n in zip(rows, self.asked)]

    def error(self, rows: list[int]) -> ModelOutputError:
        """The error of the broken rows (indices into the batch): `error.rows` lists them."""
        error = ModelOutputError(
            f"the model's logits hold NaN or infinite values (at generated token "
            f"{self.steps[rows[0]]}): its weights are likely corrupt, or a computation "
            f"overflows in this precision; check the file (kiln info, a perplexity run) or try "
            f"--backend torch / another quantization"
        )
        error.rows = rows
        return error


def launch_batch(
    logits: torch.Tensor,
    samplers: Sequence[Sampler],
    histories: Sequence[Sequence[int]],
    logprobs: Sequence[int | None] | None = None,
) -> PendingChoices:
    """sample_batch's selections, queued on the logits' device and not waited for: the
    samplers' step counts advance now (every row's; a broken row's request ends anyway)."""
    n_rows = len(samplers)
    if logits.dim() != 2 or logits.shape[0] != n_rows or len(histories) != n_rows:
        raise ValueError(
            f"sample_batch takes logits [B, n_vocab] with B samplers and B histories, got "
            f"logits {tuple(logits.shape)}, {n_rows} samplers, {len(histories)} histories"
        )
    if len({id(s) for s in samplers}) != n_rows:
        raise ValueError("a Sampler is one sequence: it may appear once in a batch")
    n_vocab = logits.shape[-1]
    asked = _logprob_counts(logprobs, n_rows, n_vocab)
    if not n_rows:
        none = torch.empty((0, 1), dtype=torch.int64, device=logits.device)
        return PendingChoices(samplers, asked, none[:, 0], none)
    uniforms = [uniform(s.seed, s.steps) for s in samplers]
    step = _Step([s.params for s in samplers], histories, uniforms, n_vocab, logits.device)
    logits = logits.float()
    finite = (logits * 0 == 0).all(-1)  # x * 0 is NaN for NaN and +-inf (isfinite: 4 kernels)
    with_logprobs = any(n is not None for n in asked)
    if step.recent or not all(step.greedy) or with_logprobs:
        # a broken row is replaced by zeros so that the stages below stay valid for every row
        # (a CUDA multinomial over NaN asserted on the device); its id is then thrown away.
        # An argmax alone takes any row: its id is thrown away all the same.
        logits = torch.where(finite[:, None], logits, 0.0)
    logits = _penalize(logits, step)
    token = torch.where(finite, _select(logits, step), -1)
    if not with_logprobs:
        out = token[:, None]
    else:
        lp = torch.log_softmax(logits, -1)
        parts = [token[:, None].double(), lp.gather(1, token.clamp(min=0)[:, None]).double()]
        n_top = max(n for n in asked if n is not None)
        if n_top:
            values, ids = torch.topk(lp, n_top, dim=-1)
            parts += [ids.double(), values.double()]
        out = torch.cat(parts, 1)
    pending = PendingChoices(samplers, asked, token, out)
    for s in samplers:
        s.steps += 1
    return pending


def _logprob_counts(
    logprobs: Sequence[int | None] | None, n_rows: int, n_vocab: int
) -> list[int | None]:
    if logprobs is None:
        return [None] * n_rows
    if len(logprobs) != n_rows:
        raise ValueError(f"logprobs has {len(logprobs)} entries for a batch of {n_rows}")
    counts = []
    for n in logprobs:
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise UsageError(f"logprobs must be None or an integer >= 0, got {n!r}")
        counts.append(None if n is None else min(int(n), n_vocab))
    return counts


def _choice(row: list[float], n: int | None) -> Choice:
    token = int(row[0])
    if n is None:
        return Choice(token)
    n_top = (len(row) - 2) // 2
    top = tuple((int(row[2 + j]), row[2 + n_top + j]) for j in range(n))
    return Choice(token, row[1], top)

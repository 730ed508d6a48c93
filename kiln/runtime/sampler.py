"""Token selection: greedy, or penalties -> top-k -> top-p -> min-p -> temperature -> draw,
the order of llama.cpp's default sampler chain. Seeded: same seed and settings, same tokens."""

from __future__ import annotations

import math
import numbers
import random
from collections import Counter
from dataclasses import dataclass, fields

import torch

from kiln.errors import ModelOutputError, UsageError

SEED_MAX = 2**64 - 1  # torch.Generator takes 64-bit seeds (llama.cpp's --seed is 32-bit)


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


class Sampler:
    """Selects on the logits' device: only the chosen token id comes back to the host."""

    def __init__(self, params: SamplingParams):
        self.params = params
        # not torch.seed(): that would reseed the caller's global torch generator
        seed = params.seed
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self.generators: dict[torch.device, torch.Generator] = {}
        self.steps = 0  # tokens selected so far

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: [n_vocab] -> the next token id. Logits with a NaN or an infinity raise a
        ModelOutputError; the test runs on the device and comes back with the token id (one
        host sync per token, as before)."""
        p = self.params
        logits = logits.float()
        finite = torch.isfinite(logits).all()
        # a broken row is replaced by zeros so that the draw below stays valid (a CUDA
        # multinomial over NaN would assert on the device); the id is then thrown away
        logits = torch.where(finite, logits, torch.zeros_like(logits))
        logits = self.penalize(logits, history)
        if p.greedy:
            token = torch.argmax(logits)
        else:
            probs = self.truncated_probs(logits)
            token = torch.multinomial(probs, 1, generator=self.generator(probs.device))[0]
        token_id = int(torch.where(finite, token, -1))
        if token_id < 0:
            raise ModelOutputError(
                f"the model's logits hold NaN or infinite values (at generated token "
                f"{self.steps + 1}): its weights are likely corrupt, or a computation overflows "
                f"in this precision; check the file (kiln info, a perplexity run) or try "
                f"--backend torch / another quantization"
            )
        self.steps += 1
        return token_id

    def penalize(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        p = self.params
        recent = history[-p.repeat_last_n :] if p.repeat_last_n else []
        if not recent or (
            p.repeat_penalty == 1.0 and p.presence_penalty == 0 and p.frequency_penalty == 0
        ):
            return logits
        logits = logits.clone()
        counts = Counter(recent)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=torch.float64, device=logits.device)
        # float64, then clamped to float32's range: extreme (finite) penalties such as 1e300
        # give -inf/+inf in float32 arithmetic, and inf - inf = NaN
        sel = logits[ids].double()
        sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        sel = sel - n * p.frequency_penalty - p.presence_penalty
        big = torch.finfo(torch.float32).max
        logits[ids] = sel.clamp(-big, big).float()
        return logits

    def truncated_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities after top-k, top-p, min-p and temperature (zeros elsewhere)."""
        p = self.params
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            before = torch.cumsum(probs, -1) - probs  # mass of the tokens ranked above
            drop = before >= p.top_p  # keep the smallest prefix reaching top_p
            drop[0] = False  # the top token always stays (a top_p below float32's range is 0)
            # scattered back to vocabulary order as a mask: no host round trip
            drop = torch.zeros_like(drop).scatter(0, order, drop)
            logits = logits.masked_fill(drop, float("-inf"))
        if p.min_p > 0:
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        # The temperature divides (logits - max) <= 0 in float64: a tiny temperature (1e-45,
        # below float32's range) gives 0 for the top token and -inf for the rest (greedy)
        # instead of inf/inf = NaN, and a huge one (1e300) gives a flat distribution. The top
        # tokens (difference 0) are set to 0 apart: CUDA divides by multiplying with 1/t, which
        # is inf for a denormal t (5e-324), and 0 * inf = NaN (seen on an H100).
        diff = (logits - logits.max()).double()
        scaled = torch.where(diff < 0, diff / p.temperature, torch.zeros_like(diff))
        return torch.softmax(scaled, -1).float()

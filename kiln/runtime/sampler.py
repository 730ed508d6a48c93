"""Token selection: greedy, or penalties -> top-k -> top-p -> min-p -> temperature -> draw,
the order of llama.cpp's default sampler chain. Seeded: same seed and settings, same tokens."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

import torch

from kiln.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; >1 discourages tokens of the last repeat_last_n
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repeat_penalty > 0, f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        _check(self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        _check(all(s for s in self.stop), "stop strings must not be empty")

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


class Sampler:
    """Selects on the logits' device: only the chosen token id comes back to the host."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else int(torch.seed() % (2**63))
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: [n_vocab] -> the next token id."""
        p = self.params
        logits = self.penalize(logits.float(), history)
        if p.greedy:
            return int(torch.argmax(logits))
        probs = self.truncated_probs(logits)
        return int(torch.multinomial(probs, 1, generator=self.generator(probs.device)))

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
        n = torch.tensor(list(counts.values()), dtype=torch.float32, device=logits.device)
        sel = logits[ids]
        sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
        sel = sel - n * p.frequency_penalty - p.presence_penalty
        logits[ids] = sel
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
            # scattered back to vocabulary order as a mask: no host round trip
            drop = torch.zeros_like(drop).scatter(0, order, drop)
            logits = logits.masked_fill(drop, float("-inf"))
        if p.min_p > 0:
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return torch.softmax(logits / p.temperature, -1)

"""The generation loop: prefill, then sample / decode until EOS, a stop string, max_tokens or
the end of the context. Yields text as it becomes final (never half a UTF-8 character, never
text that may turn out to be the start of a stop string)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kiln.runtime.engine import Engine, PromptCache
from kiln.runtime.sampler import Sampler, SamplingParams


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, found in a kept KV cache (not processed again)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        processed = self.prompt_tokens - self.cached_tokens
        return processed / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (
            f"prompt: {self.prompt_tokens} tokens{cached}, {self.prompt_tps:.1f} t/s | "
            f"generation: {self.generated_tokens} tokens, {self.generate_tps:.1f} t/s"
        )


@dataclass(slots=True)
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # eos | stop | length | context
    stats: GenerationStats = field(default_factory=GenerationStats)


def generate_stream(
    engine: Engine,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    result: Completion,
    prompt_cache: PromptCache | None = None,
) -> Iterator[str]:
    """Yields text pieces; `result` is filled as it goes (text, ids, finish reason, stats).
    prompt_cache: reuse its kept KV cache for the prompt's common prefix and keep the cache
    (prompt and reply) in it at the end."""
    from kiln.tokenizer import StreamDecoder

    sampler = Sampler(params)
    if prompt_cache is None:
        cache, cached = engine.new_cache(), 0
    else:
        cache, cached = prompt_cache.take(prompt_ids)
    stats = result.stats
    stats.prompt_tokens = len(prompt_ids)
    stats.cached_tokens = cached
    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids[cached:], cache)
    stats.prompt_seconds = time.perf_counter() - t0
    history = list(prompt_ids)
    stops = frozenset() if params.ignore_eos else tokenizer.eog_ids
    decoder = StreamDecoder(tokenizer)
    pending = ""  # decoded text held back while it could still begin a stop string
    t0 = time.perf_counter()
    result.finish_reason = "length"
    for _ in range(params.max_tokens):
        token = sampler(logits[-1], history)
        if token in stops:
            result.finish_reason = "eos"
            break
        history.append(token)
        result.token_ids.append(token)
        stats.generated_tokens += 1
        pending += decoder.feed(token)
        hit = _find_stop(pending, params.stop)
        if hit is not None:
            pending = pending[:hit]
            result.finish_reason = "stop"
            break
        safe = _safe_prefix_len(pending, params.stop)
        if safe:
            result.text += pending[:safe]
            yield pending[:safe]
            pending = pending[safe:]
        if len(result.token_ids) == params.max_tokens:
            break
        if cache.length >= engine.n_ctx:
            result.finish_reason = "context"
            break
        logits = engine.decode(token, cache)
    stats.generate_seconds = time.perf_counter() - t0
    if prompt_cache is not None:
        prompt_cache.keep(cache, history)  # before the last yield: a reader may stop there
    if result.finish_reason != "stop":
        pending += decoder.flush()
    if pending:
        result.text += pending
        yield pending


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of text that cannot be part of any stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold

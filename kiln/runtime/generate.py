"""The generation loops: prefill, then sample / decode until EOS, a stop string, max_tokens or
the end of the context; one sequence as a stream (text as it becomes final: never half a UTF-8
character, never text that may turn out to be the start of a stop string), or many as one
batch (generate_batch: each decode step runs every unfinished sequence)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from kiln.runtime.engine import Engine, PromptCache
from kiln.runtime.sampler import Choice, Sampler, SamplingParams, launch_batch, sample_batch


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
    # when log-probabilities were asked: one Choice per generated token (its logprob, top-n)
    logprobs: list[Choice] | None = None


class RowState:
    """One sequence being generated: its sampler, history, text held back for stop strings and
    the Completion it fills."""

    def __init__(self, tokenizer, prompt_ids, params: SamplingParams, result: Completion):
        from kiln.tokenizer import StreamDecoder

        self.params, self.result = params, result
        self.sampler = Sampler(params)
        self.history = list(prompt_ids)
        self.stops = frozenset() if params.ignore_eos else tokenizer.eog_ids
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""  # decoded text held back while it could still begin a stop string
        self.done = params.max_tokens == 0
        result.finish_reason = "length"
        result.stats.prompt_tokens = len(prompt_ids)

    def take(self, choice: Choice, room: bool) -> str:
        """Record a sampled token -> the text that became final; sets `done` when the row
        ends (room: whether the context holds one more token after this one)."""
        result, params = self.result, self.params
        if choice.token in self.stops:
            result.finish_reason = "eos"
            self.done = True
            return ""
        self.history.append(choice.token)
        result.token_ids.append(choice.token)
        if result.logprobs is not None:
            result.logprobs.append(choice)
        result.stats.generated_tokens += 1
        self.pending += self.decoder.feed(choice.token)
        hit = _find_stop(self.pending, params.stop)
        if hit is not None:
            self.pending = self.pending[:hit]
            result.finish_reason = "stop"
            self.done = True
            return ""
        if len(result.token_ids) == params.max_tokens:
            self.done = True
        elif not room:
            result.finish_reason = "context"
            self.done = True
        safe = _safe_prefix_len(self.pending, params.stop)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        result.text += out
        return out

    def finish(self) -> str:
        """The text held back, now final."""
        if self.result.finish_reason != "stop":
            self.pending += self.decoder.flush()
        out, self.pending = self.pending, ""
        self.result.text += out
        return out


def generate_stream(
    engine: Engine,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    result: Completion,
    prompt_cache: PromptCache | None = None,
    logprobs: int | None = None,
    overlap: bool = True,
) -> Iterator[str]:
    """Yields text pieces; `result` is filled as it goes (text, ids, finish reason, stats).
    prompt_cache: reuse its kept sequence for the prompt's common prefix and keep the sequence
    (prompt and reply) in it at the end. logprobs: record each token's log-probability and the
    top-n (0: the chosen token's only). overlap (without penalties, which read the history): each
    decode step is launched with the token just selected still on the device, and that token is
    read, detokenized and yielded while the step runs, as the server's scheduler does; a token
    that ends the reply (EOS, a stop string) has then had one step too many, whose output is
    dropped (the same tokens either way)."""
    row = RowState(tokenizer, prompt_ids, params, result)
    if logprobs is not None:
        result.logprobs = []
    if prompt_cache is None:
        seq, cached = engine.new_sequence(), 0
    else:
        seq, cached = prompt_cache.take(prompt_ids)
    kept = False
    try:
        stats = result.stats
        stats.cached_tokens = cached
        t0 = time.perf_counter()
        logits = engine.prefill(prompt_ids[cached:], seq)
        stats.prompt_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        chain = overlap and not params.penalizes
        while not row.done:
            pending = launch_batch(logits[-1:], [row.sampler], [row.history], _n(logprobs))
            length = seq.length
            ahead = chain and len(result.token_ids) + 1 < params.max_tokens
            if ahead and length < engine.n_ctx:  # the next step, before the token is read
                logits = engine.decode_batch(pending.token, [seq])
            (choice,) = pending.collect()
            if choice is None:
                raise pending.error([0])
            piece = row.take(choice, length < engine.n_ctx)
            if piece:
                yield piece
            if not row.done and seq.length == length:  # not decoded ahead
                logits = engine.decode(choice.token, seq)
        stats.generate_seconds = time.perf_counter() - t0
        # a step decoded ahead of the end wrote one row past the history (its EOS): not kept
        seq.truncate(len(row.history))
        if prompt_cache is not None:
            prompt_cache.keep(seq, row.history)  # before the last yield: a reader may stop there
            kept = True
        piece = row.finish()
        if piece:
            yield piece
    finally:
        if not kept:
            seq.free()


def generate_batch(
    engine: Engine,
    tokenizer,
    prompts: Seq[list[int]],
    params: Seq[SamplingParams],
    logprobs: int | None = None,
) -> list[Completion]:
    """Every prompt generated as one batch: each prompt's prefill, then one decode step for all
    unfinished sequences at a time (up to engine.n_seq sequences at once; more run in waves),
    each row sampled with its own parameters. -> Completions in input order."""
    results = [Completion() for _ in prompts]
    for start in range(0, len(prompts), engine.n_seq):
        wave = range(start, min(len(prompts), start + engine.n_seq))
        _generate_wave(engine, tokenizer, prompts, params, results, wave, logprobs)
    return results


def _generate_wave(engine, tokenizer, prompts, params, results, wave, logprobs) -> None:
    rows = [RowState(tokenizer, prompts[i], params[i], results[i]) for i in wave]
    seqs: list = []
    try:
        logits = []
        for i in wave:
            if logprobs is not None:
                results[i].logprobs = []
            seqs.append(engine.new_sequence())
            t0 = time.perf_counter()
            logits.append(engine.prefill(prompts[i], seqs[-1]))
            results[i].stats.prompt_seconds = time.perf_counter() - t0
        logits = torch.cat(logits)
        active = list(range(len(rows)))
        t0 = time.perf_counter()
        while active:
            live = [a for a in active if not rows[a].done]
            choices = sample_batch(
                logits,
                [rows[a].sampler for a in live],
                [rows[a].history for a in live],
                _n(logprobs, len(live)),
            )
            for a, choice in zip(live, choices):
                rows[a].take(choice, seqs[a].length < engine.n_ctx)
            active = [a for a in live if not rows[a].done]
            if active:
                logits = engine.decode_batch(
                    [rows[a].history[-1] for a in active], [seqs[a] for a in active]
                )
        seconds = time.perf_counter() - t0
        for row in rows:
            row.finish()
            row.result.stats.generate_seconds = seconds
    finally:
        for seq in seqs:
            seq.free()


def _n(logprobs: int | None, rows: int = 1) -> list[int] | None:
    return None if logprobs is None else [logprobs] * rows


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

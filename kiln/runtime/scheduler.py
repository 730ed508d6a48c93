"""The serving scheduler: one background thread that owns an Engine (which is not thread-safe:
nothing else may call it) and runs every submitted request in one continuous batch.

    sched = Scheduler(engine, tokenizer, max_queue=64)
    handle = sched.submit(prompt_ids, params, on_event, logprobs=None)   # from any thread
    handle.cancel()                                                      # from any thread
    sched.close()

Each iteration of the loop: cancelled requests leave (their sequence freed at once); waiting
requests are admitted while a slot (engine.n_seq) and the pool's blocks allow, FIFO; prompts
are processed in chunks (at most one chunk per request and `engine.ubatch` tokens in all per
iteration, in one forward), so a long prompt does not stall the running streams; then one
engine.decode_batch for every running sequence (CUDA graphs with it on the GPU) and one
selection for all rows, each with its own parameters. Text goes out through generate.py's
RowState (stop strings, EOS, max_tokens, UTF-8-safe pieces) as Events to the request's callback,
called on the scheduler thread (it must be quick and must not raise).

Overlap (on unless turned off): a decode step is launched with the ids the previous step (a decode
step, or a prompt's last chunk) selected while they are still on the device, and those ids are read,
turned into text and sent only then, while the GPU runs the new step; the host's share of a step
(reading the ids back, the tokenizer, the callbacks) then no longer adds to it. A row whose previous
token ends it (EOS, a stop string) has had one step too many, thrown away: its sequence keeps no
token past its history. Rows whose penalties read the history (repeat, presence, frequency) cannot
select before the previous ids are known: while one runs, every step waits for them.

Mix (off unless turned on): an iteration's prompt chunks run in the decode step's forward, after
the decode rows, instead of in a forward of their own before it: one pass over the weights where
there were two, at the price of an eager step (no CUDA graph) where a prompt is processed.

Prefix reuse: finished requests leave their sequence in a small LRU with the ids it holds; a
new request whose prompt shares a prefix with one forks it (copy-on-write blocks) and
processes only the rest (a chat's next turn). The LRU is dropped, oldest first, when the pool
needs room.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.errors import KilnError, UsageError
from kiln.runtime.batch import to_device
from kiln.runtime.engine import Engine, common_prefix
from kiln.runtime.generate import Completion, RowState
from kiln.runtime.kv_pool import Sequence
from kiln.runtime.sampler import Choice, PendingChoices, SamplingParams, launch_batch


class QueueFull(KilnError):
    """The scheduler's waiting queue is full: retry later."""


class SchedulerClosed(KilnError):
    """The scheduler was closed: it takes no more requests."""


@dataclass(slots=True)
class Event:
    """What a request's callback receives: a sampled token with the text that became final
    (text may be "" while held back), or the end (done: result filled, or error set)."""

    text: str = ""
    choice: Choice | None = None
    done: bool = False
    result: Completion | None = None
    error: Exception | None = None


class Handle:
    """A submitted request: cancel() it from any thread (its sequence is freed by the
    scheduler's next iteration; no further event is sent)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._scheduler._wake()


class _Request:
    __slots__ = (
        "ids", "params", "logprobs", "emit", "handle", "row", "result", "seq", "done_prefill",
        "next_token", "inflight", "submitted", "first_token_at",
    )  # fmt: skip

    def __init__(self, ids, params, logprobs, emit, handle, tokenizer):
        self.ids, self.params, self.logprobs = ids, params, logprobs
        self.emit, self.handle = emit, handle
        self.result = Completion()
        if logprobs is not None:
            self.result.logprobs = []
        self.row = RowState(tokenizer, ids, params, self.result)
        self.seq: Sequence | None = None
        self.done_prefill = 0  # prompt tokens in the sequence
        self.next_token: int | None = None  # sampled, read back, to be decoded
        self.inflight: _Inflight | None = None  # the step holding its newest token, unread
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None


class _Inflight:
    """A step's selections launched and not read yet: its rows in batch order, and each row's
    sequence length after the step (the context check of its token)."""

    __slots__ = ("rows", "choices", "lengths")

    def __init__(self, rows: list[_Request], choices: PendingChoices, lengths: list[int]):
        self.rows, self.choices, self.lengths = rows, choices, lengths


class _PrefixCache:
    """Finished sequences with the ids they hold, least recently used first; registered with
    the engine so that its reserve() drops them when the pool runs out."""

    def __init__(self, engine: Engine, size: int):
        self.engine, self.size = engine, size
        self.entries: collections.OrderedDict[int, tuple[Sequence, list[int]]] = (
            collections.OrderedDict()
        )
        self._key = 0
        engine.evictable.append(self)

    def put(self, seq: Sequence, ids: list[int]) -> None:
        if self.size <= 0 or seq.length == 0:
            seq.free()
            return
        self._key += 1
        self.entries[self._key] = (seq, list(ids[: seq.length]))
        while len(self.entries) > self.size:
            self.drop()

    def take(self, ids: list[int]) -> tuple[Sequence | None, int]:
        """A fork of the entry sharing the longest prefix with ids (at most len(ids) - 1
        tokens, so the last prompt token is run for its logits) truncated to it, and the
        prefix length; (None, 0) when none shares a token."""
        best, best_n = None, 0
        for key, (seq, held) in self.entries.items():
            n = min(common_prefix(held, ids), len(ids) - 1, seq.length)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        fork = self.engine.fork(self.entries[best][0])
        fork.truncate(best_n)
        return fork, best_n

    def drop(self, unless: Sequence | None = None) -> bool:
        """Free the least recently used entry (not `unless`) -> whether one was freed."""
        for key, (seq, _) in self.entries.items():
            if seq is not unless:
                del self.entries[key]
                seq.free()
                return True
        return False

    def clear(self) -> None:
        while self.drop():
            pass

    @property
    def blocks(self) -> int:
        return sum(len(seq.blocks) for seq, _ in self.entries.values())


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        tokenizer,
        max_queue: int = 64,
        prefix_cache: int | None = None,
        name: str = "kiln-scheduler",
        overlap: bool = True,
        mix: bool = False,
    ):
        if max_queue < 1:
            raise UsageError(f"the queue size (--max-queue) must be >= 1, got {max_queue}")
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self.cache = _PrefixCache(engine, engine.n_seq if prefix_cache is None else prefix_cache)
        self._cond = threading.Condition()
        self._incoming: collections.deque[_Request] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._unread: list[_Inflight] = []  # selections launched, their ids not read yet
        self.overlap, self.mix = overlap, mix
        self._closed = False
        # read by other threads (metrics): plain ints, updated by the loop
        self.n_waiting = 0
        self.n_running = 0
        self.kv_blocks_used = 0
        self.iterations = 0
        self.cancelled = 0  # requests cancelled before their end
        self.admitted = 0  # requests that got a slot
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------
    def submit(
        self,
        ids: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        logprobs: int | None = None,
    ) -> Handle:
        """Queue a request -> its Handle. A prompt that can never fit the context is a
        UsageError; a full queue is QueueFull."""
        n_ctx = self.engine.n_ctx
        if not ids:
            raise UsageError("the prompt is empty: give at least one token")
        if len(ids) >= n_ctx:
            raise UsageError(
                f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (one more is "
                f"needed to generate): shorten it, or start the server with a larger context (-c)"
            )
        self.engine.check_ids(ids)
        handle = Handle(self)
        request = _Request(list(ids), params, logprobs, on_event, handle, self.tokenizer)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if len(self._incoming) + len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.max_queue} requests waiting): retry later"
                )
            self._incoming.append(request)
            self.n_waiting = len(self._incoming) + len(self._waiting)
            self._cond.notify()
        return handle

    def call(self, fn: Callable[[], object], timeout: float = 30.0):
        """Run fn() on the scheduler thread between iterations -> its result (for state that
        only that thread may touch: the pool, the prefix cache)."""
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except Exception as e:  # handed to the caller
                box.append((False, e))
            done.set()

        with self._cond:
            self._calls.append(run)
            self._cond.notify()
        if not done.wait(timeout):
            raise TimeoutError("the scheduler did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def clear_cache(self) -> None:
        """Drop every kept prefix sequence."""
        self.call(self.cache.clear)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._closed
                    or self._incoming
                    or self._calls
                    or self._running
                    # a request held back for KV blocks (or cancelled while it waited): when the
                    # last running one has finished, nothing else would wake the loop for it
                    or self._waiting
                ):
                    self._cond.wait()
                if self._closed:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                calls = list(self._calls)
                self._calls.clear()
            for fn in calls:
                fn()
            try:
                self._iteration()
            except Exception as e:  # never let the thread die: fail what was running
                for r in list(self._running):
                    self._fail(r, e)
            self.iterations += 1
            self._publish()
        for r in list(self._running) + list(self._waiting) + list(self._incoming):
            self._fail(r, SchedulerClosed("the server is shutting down"))
        self.cache.clear()

    def _publish(self) -> None:
        with self._cond:
            self.n_waiting = len(self._incoming) + len(self._waiting)
        self.n_running = len(self._running)
        self.kv_blocks_used = self.engine.pool.max_blocks - 1 - self.engine.pool.free_blocks

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        chunks = self._chunks()
        if chunks and not self.mix:
            self._prefill(chunks)
            chunks = []
        self._decode(chunks)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.handle.cancelled]:
            self._release(r)
            self.cancelled += 1
        waiting = len(self._waiting)
        self._waiting = collections.deque(r for r in self._waiting if not r.handle.cancelled)
        self.cancelled += waiting - len(self._waiting)

    def _admit(self) -> None:
        pool = self.engine.pool
        while self._waiting and len(self._running) < self.engine.n_seq:
            r = self._waiting[0]
            if r.row.done:  # max_tokens = 0: nothing to generate
                self._waiting.popleft()
                self._finish(r)
                continue
            seq, cached = self.cache.take(r.ids)
            need = -(-(len(r.ids) + 1) // pool.block_size) - (len(seq.blocks) if seq else 0) + 1
            while pool.free_blocks < need and self.cache.drop(seq):
                pass
            if pool.free_blocks < need and self._running:
                if seq is not None:
                    seq.free()
                return  # wait for a running request to finish
            self._waiting.popleft()
            self.admitted += 1
            r.seq = seq if seq is not None else self.engine.new_sequence()
            r.done_prefill = cached
            r.result.stats.cached_tokens = cached
            self._running.append(r)

    def _chunks(self) -> list[tuple[_Request, list[int]]]:
        """This iteration's prompt chunks: (request, its next ids), at most one a request and
        engine.ubatch ids in all, in admission order."""
        budget, chunks = self.engine.ubatch, []
        for r in self._running:
            if r.done_prefill >= len(r.ids) or budget <= 0:
                continue
            chunk = r.ids[r.done_prefill : r.done_prefill + budget]
            budget -= len(chunk)
            chunks.append((r, chunk))
        return chunks

    def _prefill(self, chunks: list[tuple[_Request, list[int]]]) -> None:
        """The prompt chunks in a forward of their own; the first tokens of the prompts they
        end are selected, to be read after the decode step's launch."""
        t0 = time.perf_counter()
        try:
            logits = self.engine.step([(r.seq, chunk) for r, chunk in chunks], "last")
        except Exception as e:
            for r, _ in chunks:
                self._fail(r, e)
            return
        ready = self._prefilled(chunks, time.perf_counter() - t0)
        if ready:
            step = self._launch([r for _, r in ready], logits[[i for i, _ in ready]])
            if step is not None:
                self._unread.append(step)

    def _prefilled(self, chunks, seconds: float) -> list[tuple[int, _Request]]:
        """Count the chunks as processed -> (chunk index, request) of the prompts now whole."""
        ready = []
        for i, (r, chunk) in enumerate(chunks):
            r.done_prefill += len(chunk)
            r.result.stats.prompt_seconds += seconds
            if r.done_prefill == len(r.ids):
                ready.append((i, r))
        return ready

    def _decode(self, chunks: list[tuple[_Request, list[int]]]) -> None:
        """One forward of every running sequence's next token (with `mix`, beside the prompt
        chunks), and the selection of their next tokens (and of the prompts the chunks end)."""
        unread, self._unread = self._unread, []
        for step in [s for s in unread if not self._chains(s)]:
            self._resolve(step)
            unread.remove(step)
        rows = [r for r in self._running if r.next_token is not None or self._continues(r)]
        if rows or chunks:
            t0 = time.perf_counter()
            try:
                tokens = self._tokens(rows, unread) if rows else []
                if chunks:
                    logits = self._mixed(rows, tokens, chunks)
                else:
                    logits = self.engine.decode_batch(tokens, [r.seq for r in rows])
            except Exception as e:
                for step in unread:
                    self._resolve(step)
                for r in rows + [r for r, _ in chunks]:
                    if r.seq is not None:
                        self._fail(r, e)
                return
            ready = self._prefilled(chunks, time.perf_counter() - t0)
            if chunks:  # the decode rows', then those of the prompts the chunks end
                index = list(range(len(rows))) + [len(rows) + i for i, _ in ready]
                rows, logits = rows + [r for _, r in ready], logits[index]
            step = self._launch(rows, logits) if rows else None
            if step is not None:
                self._unread.append(step)
        for step in unread:
            self._resolve(step)  # while the GPU runs the step just launched
        if not self.overlap:
            for step in self._unread:
                self._resolve(step)
            self._unread = []

    def _mixed(self, rows: list[_Request], tokens, chunks) -> torch.Tensor:
        """One forward of the decode rows' tokens (a host list, or ids on the device) followed
        by the prompt chunks -> logits of each entry's last token, in that order."""
        prompt_entries = [(r.seq, chunk) for r, chunk in chunks]
        if not isinstance(tokens, torch.Tensor):
            decode = [(r.seq, [t]) for r, t in zip(rows, tokens)]
            return self.engine.step(decode + prompt_entries, "last")
        entries = [(r.seq, [0]) for r in rows] + prompt_entries
        prompts = [t for _, chunk in chunks for t in chunk]
        ids = torch.cat([tokens.clamp(min=0), to_device(prompts, torch.int64, tokens.device)])
        return self.engine.step(entries, "last", tokens=ids)

    def _chains(self, step: _Inflight) -> bool:
        """Whether the next step may be launched before `step`'s ids are read."""
        return self.overlap and not any(r.params.penalizes for r in step.rows)

    def _continues(self, r: _Request) -> bool:
        """Whether r's unread token is decoded in the next step: unless it is r's last by
        max_tokens or the context (an EOS or a stop string is only seen when read)."""
        return (
            r.inflight is not None
            and len(r.result.token_ids) + 1 < r.params.max_tokens
            and r.seq.length < self.engine.n_ctx
        )

    def _tokens(self, rows: list[_Request], unread: list[_Inflight]):
        """The step's input ids: a host list when every row's is known, else a device tensor
        with the unread ones taken from the selections of the steps that made them."""
        if all(r.next_token is not None for r in rows):
            return [r.next_token for r in rows]
        at, k = {}, 0  # a row's place among the unread steps' ids, side by side
        for step in unread:
            for i, r in enumerate(step.rows):
                if r.inflight is step:
                    at[id(r)] = k + i
            k += len(step.rows)
        known = [r.next_token for r in rows if r.next_token is not None]
        index = []
        for r in rows:
            if r.next_token is None:
                index.append(at[id(r)])
            else:
                index.append(k)
                k += 1
        parts = [step.choices.token for step in unread]
        if not known and len(parts) == 1 and index == list(range(len(rows))):
            return parts[0][: len(rows)]  # the last step's rows, or the first of them
        device = parts[0].device
        if known:
            parts.append(to_device(known, torch.int64, device))
        return torch.cat(parts)[to_device(index, torch.int64, device)]

    def _launch(self, rows: list[_Request], logits) -> _Inflight | None:
        """Queue the rows' selections -> the step, their ids unread (None: it failed, and so
        did its rows)."""
        try:
            choices = launch_batch(
                logits,
                [r.row.sampler for r in rows],
                [r.row.history for r in rows],
                [r.logprobs for r in rows],
            )
        except Exception as e:
            for r in rows:
                self._fail(r, e)
            return None
        step = _Inflight(rows, choices, [r.seq.length for r in rows])
        for r in rows:
            r.next_token, r.inflight = None, step
        return step

    def _resolve(self, step: _Inflight) -> None:
        """Read a step's ids and hand each live row its token."""
        choices = step.choices.collect()
        now = time.perf_counter()
        for i, (r, choice, length) in enumerate(zip(step.rows, choices, step.lengths)):
            if r.seq is None:  # finished, failed or cancelled since the step was launched
                continue
            newest = r.inflight is step
            if newest:
                r.inflight = None
            if choice is None:
                self._fail(r, step.choices.error([i]))
                continue
            if r.first_token_at is None:
                r.first_token_at = now
            piece = r.row.take(choice, length < self.engine.n_ctx)
            _emit(r, Event(text=piece, choice=choice))
            if r.row.done:
                r.result.stats.generate_seconds = now - r.first_token_at
                self._finish(r)
            elif newest:
                r.next_token = choice.token

    def _finish(self, r: _Request) -> None:
        piece = r.row.finish()
        if r in self._running:
            self._running.remove(r)
        if r.seq is not None:
            # a step launched before r's end was known wrote one row past it (its last token,
            # or an EOS that is not in the history): not kept
            r.seq.truncate(len(r.row.history))
            self.cache.put(r.seq, r.row.history)
            r.seq = None
        _emit(r, Event(text=piece, done=True, result=r.result))

    def _fail(self, r: _Request, error: Exception) -> None:
        self._release(r)
        _emit(r, Event(done=True, result=r.result, error=error))

    def _release(self, r: _Request) -> None:
        if r in self._running:
            self._running.remove(r)
        if r.seq is not None:
            r.seq.free()
            r.seq = None
        r.next_token, r.inflight = None, None


def _emit(r: _Request, event: Event) -> None:
    try:
        r.emit(event)
    except Exception:  # a callback's failure is its request's, never the loop's
        r.handle.cancelled = True

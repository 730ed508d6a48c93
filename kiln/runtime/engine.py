"""Engine: a built model plus its KV caches; prompt processing in micro-batches and the decode
step. One Engine serves one sequence at a time (a fresh cache per request, or a PromptCache's
kept one when a request extends the previous: a chat's next turn).

On the triton backend the engine is static: its one KV cache (f16) is allocated at the full
context, reused by every request, and decoding runs the model's decode_step, captured as a CUDA
graph when the cuda_graphs fusion is on. The reference backend grows a float32 cache as needed
and decodes through forward().
"""

from __future__ import annotations

import torch

from kiln.errors import UsageError
from kiln.models.common import DecoderModel
from kiln.runtime.cuda_graph import DecodeGraph
from kiln.runtime.kv_cache import KVCache


class Engine:
    def __init__(self, model: DecoderModel, n_ctx: int, ubatch: int = 512):
        if n_ctx <= 0:
            raise UsageError(f"the context size must be > 0, got {n_ctx}")
        if ubatch <= 0:
            raise UsageError(f"the micro-batch size (--ubatch) must be > 0, got {ubatch}")
        self.model, self.n_ctx, self.ubatch = model, n_ctx, ubatch
        self.config = model.config
        self.device = model.device
        self.static = model.ops.name == "triton"
        self.graphs = model.policy.cuda_graphs
        self._cache: KVCache | None = None
        self._cache_owner: PromptCache | None = None  # who may reuse the static cache's contents
        self._graph: DecodeGraph | None = None

    def new_cache(self) -> KVCache:
        """An empty cache; a static engine empties and returns its one cache (captured graphs
        point at its buffers)."""
        if not self.static:
            return KVCache(self.config, self.n_ctx, self.device)
        if self._cache is None:
            self._cache = KVCache(
                self.config, self.n_ctx, self.device, dtype=torch.float16, initial=self.n_ctx
            )
        self._cache.length = 0
        self._cache_owner = None
        return self._cache

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Append ids to the cache in micro-batches of `ubatch` tokens.

        -> logits float32 [1, n_vocab] of the last token, or [len(ids), n_vocab] if all_logits.
        """
        if not ids:
            raise UsageError("the prompt is empty: give at least one token")
        self.check_room(cache, len(ids))
        self.check_ids(ids)
        out = []
        for s in range(0, len(ids), self.ubatch):
            chunk = torch.tensor(ids[s : s + self.ubatch], device=self.device)
            last = s + self.ubatch >= len(ids)
            if all_logits or last:
                out.append(self.model.forward(chunk, cache, all_logits=all_logits))
            else:
                self.model.forward(chunk, cache, all_logits=False)
        return torch.cat(out)

    @torch.inference_mode()
    def decode(self, token: int, cache: KVCache) -> torch.Tensor:
        """One token -> logits float32 [1, n_vocab] (on a static engine a buffer that the next
        decode overwrites)."""
        self.check_room(cache, 1)
        if not self.static:
            return self.model.forward(torch.tensor([token], device=self.device), cache)
        if cache is not self._cache:
            raise UsageError(
                "a static (triton) engine decodes into its own KV cache: get it from "
                "engine.new_cache()"
            )
        position = cache.length
        if self.graphs:
            if self._graph is None:
                self._graph = DecodeGraph(self.model, cache)
            logits = self._graph(token, position)
        else:
            ids = torch.tensor([token], device=self.device)
            at = torch.tensor([position], device=self.device)
            logits = self.model.decode_step(ids, at, cache)
        cache.length = position + 1
        return logits

    def check_room(self, cache: KVCache, n: int) -> None:
        if cache.length + n > self.n_ctx:
            raise UsageError(
                f"{cache.length + n} tokens do not fit the context of {self.n_ctx} "
                f"({cache.length} already in the cache, {n} new): shorten the prompt, raise the "
                f"context size (n_ctx / --ctx-size, at most {self.config.n_ctx_train}), "
                f"or allow truncation (truncate=True / --truncate)"
            )

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.config.n_vocab]
        if bad:
            raise UsageError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})"
            )


class PromptCache:
    """A KV cache kept between requests with the token ids it holds, so that a request that
    extends the previous one (a chat's next turn: the conversation so far, the reply, the new
    message) prefills only what follows their longest common prefix.

        cache, n = prompt_cache.take(ids)   # cache holds ids[:n]; prefill ids[n:]
        ...                                 # prefill, decode
        prompt_cache.keep(cache, history)   # cache holds history[:cache.length]

    A static engine has one cache: any other request (engine.new_cache()) empties it, and the
    next take() then starts from nothing. A taken cache not given back (a stream left unread)
    is not reused either."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cache: KVCache | None = None
        self.ids: list[int] = []  # the tokens the kept cache holds, in order

    def take(self, ids: list[int]) -> tuple[KVCache, int]:
        """A cache holding ids[:n] and n: the longest common prefix of ids with the kept ids,
        at most len(ids) - 1 (the last token is always run, for its logits)."""
        engine = self.engine
        if engine.static:
            if engine._cache_owner is self and engine._cache is not None:
                cache = engine._cache
            else:
                cache = engine.new_cache()
                self.ids = []
            engine._cache_owner = self
        else:
            cache, self._cache = self._cache, None
            if cache is None:
                cache = engine.new_cache()
                self.ids = []
        n = min(common_prefix(self.ids, ids), len(ids) - 1, cache.length)
        cache.truncate(max(n, 0))
        self.ids = []  # lent out: nothing is kept until keep()
        return cache, cache.length

    def keep(self, cache: KVCache, ids: list[int]) -> None:
        """Keep `cache`, whose first cache.length tokens are ids[:cache.length]."""
        if self.engine.static:
            if self.engine._cache_owner is not self or cache is not self.engine._cache:
                return  # another request has used the engine's one cache since
        else:
            self._cache = cache
        self.ids = list(ids[: cache.length])

    def clear(self) -> None:
        """Forget the kept tokens (a chat's /reset)."""
        self._cache = None
        self.ids = []
        if self.engine._cache_owner is self:
            self.engine._cache_owner = None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

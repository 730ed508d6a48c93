"""Engine: a built model, its paged KV pool and its CUDA graphs; every forward goes through
`step` (one ForwardBatch of any mix of prompt chunks and decode tokens).

    seq = engine.new_sequence()                 # a sequence of the pool (free it when done)
    logits = engine.prefill(ids, seq)           # a prompt, in micro-batches of `ubatch` tokens
    logits = engine.decode_batch(tokens, seqs)  # one token for each of B sequences
    seq.free()

On the triton backend the pool is f16 and starts at one full context (n_ctx tokens), decode
batches run as CUDA graphs per batch-size bucket when the cuda_graphs fusion is on, and a
prompt's full micro-batches as CUDA graphs when the prompt_graphs fusion is on; the
reference backends keep a float32 pool that grows as needed. cache_type_k / cache_type_v choose
other K / V cache types (llama.cpp's -ctk / -ctv: f32, f16, bf16, q8_0, q4_0; kiln/quant/kv.py),
checked against the model's head sizes and what the backend's attention reads. The pool holds
up to n_seq sequences of n_ctx tokens; sequences a PromptCache keeps for reuse are given back
when it runs out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

import torch

from kiln.errors import UsageError
from kiln.models.common import DecoderModel
from kiln.ops import check_kv_cache_types
from kiln.quant.kv import KVCacheType, cache_type
from kiln.runtime.batch import build_batch
from kiln.runtime.graphs import GraphRunner, buckets_for
from kiln.runtime.kv_pool import DEFAULT_BLOCK_SIZE, KVPool, KVPoolFull, Sequence
from kiln.runtime.prompt_graphs import PromptGraphs


def kv_dtype(backend: str) -> torch.dtype:
    """The KV cache's element type on a backend: f16 where kernels read it (triton), float32 on
    the reference paths."""
    return torch.float16 if backend == "triton" else torch.float32


def kv_cache_types(
    backend: str,
    config,
    cache_type_k: str | KVCacheType | None = None,
    cache_type_v: str | KVCacheType | None = None,
) -> tuple[KVCacheType, KVCacheType]:
    """The K and V cache types of an engine: the given ones, else the backend's kv_dtype; a
    UsageError for a name that is not a type or a type the backend's attention does not read
    (the pool checks the head sizes: KVPool)."""
    default = kv_dtype(backend)
    k = cache_type(default if cache_type_k is None else cache_type_k, "K cache type (-ctk)")
    v = cache_type(default if cache_type_v is None else cache_type_v, "V cache type (-ctv)")
    check_kv_cache_types(backend, k, v)
    return k, v


class Engine:
    def __init__(
        self,
        model: DecoderModel,
        n_ctx: int,
        ubatch: int = 512,
        n_seq: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
        cache_type_k: str | KVCacheType | None = None,
        cache_type_v: str | KVCacheType | None = None,
    ):
        if n_ctx <= 0:
            raise UsageError(f"the context size must be > 0, got {n_ctx}")
        if ubatch <= 0:
            raise UsageError(f"the micro-batch size (--ubatch) must be > 0, got {ubatch}")
        if n_seq <= 0:
            raise UsageError(f"the number of parallel sequences must be > 0, got {n_seq}")
        self.model, self.n_ctx, self.ubatch, self.n_seq = model, n_ctx, ubatch, n_seq
        self.config = model.config
        self.device = model.device
        static = model.ops.name == "triton"
        self.cache_types = kv_cache_types(model.ops.name, self.config, cache_type_k, cache_type_v)
        self.pool = KVPool(
            self.config,
            n_ctx,
            n_seq,
            self.device,
            self.cache_types[0],
            block_size,
            # triton: one sequence's whole context (graphs see no growth at batch 1); else the
            # pool's default start
            initial_tokens=n_ctx if static else None,
            v_type=self.cache_types[1],
        )
        on_gpu = static and self.device.type == "cuda"
        buckets = buckets_for(n_seq, self.config.moe)
        graphs = on_gpu and model.policy.cuda_graphs
        self.graphs = GraphRunner(model, self.pool, buckets) if graphs else None
        prompt_graphs = on_gpu and model.policy.prompt_graphs
        self.prompt_graphs = PromptGraphs(model, self.pool, ubatch) if prompt_graphs else None
        self.evictable: list = []  # PromptCaches whose kept sequence may be dropped for room

    # -- sequences ---------------------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        return self.pool.new_sequence()

    def fork(self, seq: Sequence) -> Sequence:
        """A new sequence holding seq's tokens, sharing their blocks (copy-on-write)."""
        return self.pool.fork(seq)

    def reserve(self, seq: Sequence, n_new: int) -> None:
        """Room for n_new more tokens of seq: the context checked, blocks allocated (kept
        prompt caches dropped when the pool is out of blocks)."""
        self.check_room(seq, n_new)
        while True:
            try:
                return self.pool.reserve(seq, n_new)
            except KVPoolFull:
                if not self._evict(seq):
                    raise

    def _evict(self, keep: Sequence) -> bool:
        for cache in self.evictable:
            if cache.drop(keep):
                return True
        return False

    # -- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(
        self,
        entries: Seq[tuple[Sequence, Seq[int]]],
        logits: str = "last",
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward of (sequence, new token ids) entries -> float32 logits: [B, n_vocab] of
        each sequence's last token ("last"), [T, n_vocab] of every token ("all") or [0, n_vocab]
        ("none"). The sequences' lengths advance. tokens: the T ids on the device, in place of
        the entries' (which then only count them)."""
        for seq, ids in entries:
            if not ids:
                raise UsageError("the prompt is empty: give at least one token")
            if tokens is None:
                self.check_ids(ids)
            self.reserve(seq, len(ids))
        if tokens is None and self.prompt_graphs and self.prompt_graphs.serves(entries, logits):
            ((seq, ids),) = entries
            out = self.prompt_graphs(seq, ids, logits)
            if out is not None:
                seq.length += len(ids)
                return out
        batch = build_batch(entries, self.device, logits)
        if tokens is not None:
            batch = dataclasses.replace(batch, tokens=tokens)
        out = self.model.forward(batch, self.pool)
        for seq, ids in entries:
            seq.length += len(ids)
        return out

    def prefill(self, ids: list[int], seq: Sequence, all_logits: bool = False) -> torch.Tensor:
        """Append ids to seq in micro-batches of `ubatch` tokens.

        -> logits float32 [1, n_vocab] of the last token, or [len(ids), n_vocab] if all_logits.
        """
        if not ids:
            raise UsageError("the prompt is empty: give at least one token")
        self.check_room(seq, len(ids))
        self.check_ids(ids)
        out = []
        for s in range(0, len(ids), self.ubatch):
            chunk = ids[s : s + self.ubatch]
            last = s + self.ubatch >= len(ids)
            want = "all" if all_logits else ("last" if last else "none")
            out.append(self.step([(seq, chunk)], want))
        return torch.cat(out)

    def decode(self, token: int, seq: Sequence) -> torch.Tensor:
        """One token -> logits float32 [1, n_vocab] (with CUDA graphs: a buffer that the next
        decode overwrites)."""
        return self.decode_batch([token], [seq])

    @torch.inference_mode()
    def decode_batch(self, tokens: Seq[int] | torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for each of B distinct sequences -> logits float32 [B, n_vocab], row b for
        seqs[b] (with CUDA graphs: a buffer that the next decode overwrites). tokens: ids on the
        host, or int64 [B] on the device (a step's sampled ids, not yet read back: the next
        step is queued behind the last one without waiting for it; a negative id, a broken
        row's, decodes as 0)."""
        if len(tokens) != len(seqs) or not seqs:
            raise UsageError(f"decode_batch: {len(tokens)} tokens for {len(seqs)} sequences")
        if len({id(s) for s in seqs}) != len(seqs):
            raise UsageError("decode_batch: a sequence appears twice in one batch")
        on_device = isinstance(tokens, torch.Tensor)
        if on_device:
            tokens = tokens.clamp(min=0)

        def eagerly() -> torch.Tensor:
            if on_device:
                return self.step([(s, [0]) for s in seqs], tokens=tokens)
            return self.step([(s, [t]) for s, t in zip(seqs, tokens)])

        if self.graphs is None or not self.graphs.serves(len(seqs)):
            return eagerly()
        if not on_device:
            self.check_ids(tokens)
        for seq in seqs:
            self.reserve(seq, 1)
        logits = self.graphs(tokens, seqs)
        if logits is None:  # the bucket's capture failed: eagerly (the blocks are reserved)
            return eagerly()
        for seq in seqs:
            seq.length += 1
        return logits

    @torch.inference_mode()
    def warm_up(self, force: bool = False) -> int:
        """Run once, before a server's first request, every shape of forward it will meet, and
        allocate the whole KV pool. On the GPU the first forward of a shape compiles its Triton
        kernels (seconds each; on disk for the next start) and a decode batch of up to
        graphs.max_batch rows captures its CUDA graph: a client would otherwise wait for them
        in the middle of its stream. Shapes: decode batches (one token a sequence) of each graph
        bucket and each GEMM row bucket up to n_seq, the bucket's top and one less (Triton
        compiles a row count divisible by 16 apart); prompt chunks of the same sizes up to
        ubatch tokens, over several sequences where one context is smaller (a server's
        prompts of several requests share a forward). The sequences used are freed: no state
        is left but the pool, the graphs and the compiled kernels. Nothing runs on the CPU
        unless forced (no compiles there). -> forwards run."""
        if self.device.type != "cuda" and not force:
            return 0
        from kiln.kernels.matmul import M_BUCKETS

        def sizes(limit: int) -> list[int]:
            out = {limit}
            for b in (1, 2, 4, 8, *M_BUCKETS):
                if b <= limit:
                    out |= {b, max(1, b - 1)}
            return sorted(out)

        self.pool.grow_to_max()
        runs = 0
        for b in sizes(self.n_seq):
            seqs = [self.new_sequence() for _ in range(b)]
            self.step([(s, [0]) for s in seqs])  # b one-token prompts: a prompt-path forward
            self.decode_batch([0] * b, seqs)  # the decode path (its graph, where it has one)
            for s in seqs:
                s.free()
            runs += 2
        per = self.n_ctx - 1  # a prompt that leaves its sequence room for a token
        for t in sizes(min(self.ubatch, per * self.n_seq)):
            if t > 1:  # t tokens in one forward: as many sequences as their context needs
                seqs = [self.new_sequence() for _ in range(-(-t // per))]
                entries = [(s, [0] * min(per, t - i * per)) for i, s in enumerate(seqs)]
                # with prompt_graphs one sequence's full micro-batch also without logits (a long
                # prompt's leading chunks): each logits form is a graph of its own
                full = self.prompt_graphs is not None and len(seqs) == 1 and t == self.ubatch
                forms = ("last", "none") if full else ("last",)
                for want in forms:
                    self.step(entries, want)
                    for s in seqs:
                        s.truncate(0)
                    runs += 1
                for s in seqs:
                    s.free()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return runs

    # -- checks ------------------------------------------------------------------------------
    def check_room(self, seq: Sequence, n: int) -> None:
        if seq.freed:
            raise UsageError("this sequence was freed: start a new one (engine.new_sequence())")
        if seq.length + n > self.n_ctx:
            raise UsageError(
                f"{seq.length + n} tokens do not fit the context of {self.n_ctx} "
                f"({seq.length} already in the cache, {n} new): shorten the prompt, raise the "
                f"context size (n_ctx / --ctx-size, at most {self.config.n_ctx_train}), "
                f"or allow truncation (truncate=True / --truncate)"
            )

    def check_ids(self, ids: Seq[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.config.n_vocab]
        if bad:
            raise UsageError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})"
            )


class PromptCache:
    """A sequence kept between requests with the token ids it holds, so that a request that
    extends the previous one (a chat's next turn: the conversation so far, the reply, the new
    message) prefills only what follows their longest common prefix.

        seq, n = prompt_cache.take(ids)   # seq holds ids[:n]; prefill ids[n:]
        ...                               # prefill, decode
        prompt_cache.keep(seq, history)   # seq holds history[:seq.length]

    The kept sequence holds blocks of the engine's pool; when the pool runs out the engine
    drops it (the next take() then starts from nothing). A taken sequence not given back (a
    stream left unread) is freed by its stream."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._seq: Sequence | None = None
        self.ids: list[int] = []  # the tokens the kept sequence holds, in order
        engine.evictable.append(self)

    def take(self, ids: list[int]) -> tuple[Sequence, int]:
        """A sequence holding ids[:n] and n: the longest common prefix of ids with the kept ids,
        at most len(ids) - 1 (the last token is always run, for its logits)."""
        seq, self._seq = self._seq, None
        if seq is None:
            seq = self.engine.new_sequence()
            self.ids = []
        n = min(common_prefix(self.ids, ids), len(ids) - 1, seq.length)
        seq.truncate(max(n, 0))
        self.ids = []  # lent out: nothing is kept until keep()
        return seq, seq.length

    def keep(self, seq: Sequence, ids: list[int]) -> None:
        """Keep `seq`, whose first seq.length tokens are ids[:seq.length]."""
        if self._seq is not None and self._seq is not seq:
            self._seq.free()
        self._seq = seq
        self.ids = list(ids[: seq.length])

    def drop(self, unless: Sequence | None = None) -> bool:
        """Free the kept sequence (not `unless`) -> whether anything was freed."""
        if self._seq is None or self._seq is unless:
            return False
        self._seq.free()
        self._seq, self.ids = None, []
        return True

    def clear(self) -> None:
        """Forget the kept tokens (a chat's /reset)."""
        self.drop()


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

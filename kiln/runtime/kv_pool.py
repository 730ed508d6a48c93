"""The paged KV cache: one pool of fixed-size blocks per layer, shared by every sequence.

Per layer the pool is K [S, Hkv, D] and V [S, Hkv, Dv] with S = n_blocks * block_size rows, each in
its cache type (kiln/quant/kv.py: by default f16 on the GPU, float32 on the reference path; q8_0 /
q4_0 store the rows as GGML blocks along the head, scales then quants, a QuantizedRows). A
`Sequence` owns a list of blocks: its position j lives in row blocks[j // block_size] * block_size
+ j % block_size (the token's "slot"). Blocks are allocated here and only here (the model never
allocates; it writes the slots a ForwardBatch names), freed when a sequence is freed or truncated,
and shared between forked sequences (a common prompt prefix) with a reference count: a sequence
about to write into a shared block copies it first (copy-on-write), so a fork never changes its
parent.

Block 0 is the scratch block: never given to a sequence, it is where the padded rows of a
CUDA-graph batch bucket write and read (kiln/runtime/graphs.py).

The pool starts small and doubles up to its limit (n_seq sequences of n_ctx tokens), so a short
chat does not allocate the whole context; a growth moves the tensors, which the engine notices
(`generation`) to recapture its graphs. Running out is a KVPoolFull error naming the limit.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.errors import UsageError
from kiln.limits import check_memory, kv_cache_bytes
from kiln.quant.kv import KVCacheType, QuantizedRows, cache_type

SCRATCH_BLOCK = 0
DEFAULT_BLOCK_SIZE = 64  # tokens per block (the Engine's default)


def full_pool_rows(n_ctx: int, n_seq: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Rows of a pool at its limit: n_seq sequences of n_ctx tokens in whole blocks, plus the
    scratch block."""
    return (n_seq * -(-n_ctx // block_size) + 1) * block_size


class KVPoolFull(UsageError):
    """The pool has no free block left at its limit."""


class Sequence:
    """One sequence's view of the pool: its blocks and the number of tokens stored (`length`,
    the next position). Made by KVPool.new_sequence / fork; freed with free(), or when the
    last reference to it goes."""

    __slots__ = ("pool", "blocks", "length", "freed")

    def __init__(self, pool: KVPool, blocks: list[int], length: int):
        self.pool, self.blocks, self.length, self.freed = pool, blocks, length, False

    def truncate(self, length: int) -> None:
        """Forget everything from position `length` on (e.g. to re-run a prompt's last token);
        blocks past the new end go back to the pool."""
        self.length = max(0, min(length, self.length))
        keep = -(-self.length // self.pool.block_size)
        self.pool.release(self.blocks[keep:])
        del self.blocks[keep:]

    def __del__(self) -> None:  # a sequence nobody holds gives its blocks back
        try:
            self.free()
        except Exception:  # interpreter shutdown: the pool may be gone already
            pass

    def free(self) -> None:
        if not self.freed:
            self.pool.release(self.blocks)
            self.blocks, self.length, self.freed = [], 0, True

    def slot(self, position: int) -> int:
        bs = self.pool.block_size
        return self.blocks[position // bs] * bs + position % bs

    def first_row(self) -> int | None:
        """The pool row of position 0 when the blocks are consecutive (then rows 0..length-1
        are one slice of the pool), else None."""
        b = self.blocks
        if b and b[-1] - b[0] == len(b) - 1 and all(y == x + 1 for x, y in zip(b, b[1:])):
            return b[0] * self.pool.block_size
        return None


class KVPool:
    def __init__(
        self,
        config: ModelConfig,
        n_ctx: int,
        n_seq: int,
        device: torch.device,
        k_type: torch.dtype | str | KVCacheType = torch.float32,
        block_size: int = DEFAULT_BLOCK_SIZE,
        initial_tokens: int | None = None,
        v_type: torch.dtype | str | KVCacheType | None = None,
    ):
        """k_type / v_type: the K and V cache types (kiln/quant/kv.py; V: K's when None)."""
        if block_size < 16 or block_size & (block_size - 1):
            raise UsageError(f"the KV block size must be a power of 2 >= 16, got {block_size}")
        self.k_type = cache_type(k_type, "K cache type")
        self.v_type = cache_type(k_type if v_type is None else v_type, "V cache type")
        self.k_type.check_head_dim(config.head_dim, "K")
        self.v_type.check_head_dim(config.head_dim_v, "V")
        self.config, self.device = config, device
        self.dtype = self.k_type.dtype  # the K rows' float dtype (None for a block type)
        self.n_ctx, self.n_seq, self.block_size = n_ctx, n_seq, block_size
        self.blocks_per_seq = -(-n_ctx // block_size)
        self.max_blocks = full_pool_rows(n_ctx, n_seq, block_size) // block_size
        self.k: list[torch.Tensor | QuantizedRows] = []
        self.v: list[torch.Tensor | QuantizedRows] = []
        self.n_blocks = 0
        self.refs: list[int] = []  # per block: sequences holding it (scratch: 1, never freed)
        self._free: list[int] = []  # free block ids, the lowest last (allocated first)
        self.generation = 0  # bumped when the tensors move (a growth)
        if initial_tokens is None:  # 256 rows in all, the scratch block among them
            start = max(2, 256 // block_size)
        else:  # room for initial_tokens, plus the scratch block
            start = max(2, -(-initial_tokens // block_size) + 1)
        self._grow(min(self.max_blocks, start))

    # -- memory ------------------------------------------------------------------------------
    def _grow(self, n_blocks: int) -> None:
        c, rows = self.config, n_blocks * self.block_size
        check_memory(
            kv_cache_bytes(c, rows, self.k_type, self.v_type),
            self.device,
            f"a KV cache of {rows} tokens ({c.n_layer} layers, K {self.k_type.name}, "
            f"V {self.v_type.name})",
            "use a smaller context (-c / n_ctx), fewer parallel sequences or fewer tokens",
        )
        old = self.n_blocks * self.block_size
        heads, dev = c.n_head_kv, self.device
        new_k = [self.k_type.allocate(rows, heads, c.head_dim, dev) for _ in self.layers]
        new_v = [self.v_type.allocate(rows, heads, c.head_dim_v, dev) for _ in self.layers]
        for was, now in zip(self.k + self.v, new_k + new_v):
            now[:old] = was
        self.k, self.v = new_k, new_v
        first = self.n_blocks
        self.refs += [0] * (n_blocks - first)
        if first == 0:
            self.refs[SCRATCH_BLOCK] = 1
            first = 1
        self._free = list(range(n_blocks - 1, first - 1, -1)) + self._free
        self.n_blocks = n_blocks
        self.generation += 1

    def grow_to_max(self) -> None:
        """Allocate the whole pool now (room for n_seq full contexts): a server owns its memory
        from the start, and its CUDA graphs are never captured again for a growth."""
        if self.n_blocks < self.max_blocks:
            self._grow(self.max_blocks)

    @property
    def layers(self) -> range:
        return range(self.config.n_layer)

    @property
    def rows(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks that can still be handed out (free now, or by growing)."""
        return len(self._free) + self.max_blocks - self.n_blocks

    # -- blocks ------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            if n > self.free_blocks:
                raise KVPoolFull(
                    f"the KV cache is full: {n} more blocks of {self.block_size} tokens are "
                    f"needed and {self.free_blocks} are free (the pool holds {self.n_seq} "
                    f"sequence(s) of {self.n_ctx} tokens: {self.max_blocks - 1} blocks); "
                    f"finish or free a sequence, or use a larger context / more parallel "
                    f"sequences"
                )
            want = self.n_blocks + n - len(self._free)
            self._grow(min(self.max_blocks, max(want, 2 * self.n_blocks)))
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released twice"
            if self.refs[b] == 0:
                self._free.append(b)

    # -- sequences ---------------------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        return Sequence(self, [], 0)

    def fork(self, seq: Sequence) -> Sequence:
        """A new sequence holding seq's tokens, sharing its blocks until either writes."""
        for b in seq.blocks:
            self.refs[b] += 1
        return Sequence(self, list(seq.blocks), seq.length)

    def reserve(self, seq: Sequence, n_new: int) -> None:
        """Make seq able to store n_new more tokens: its partial last block made its own when
        shared (copy-on-write), new blocks allocated; the context limit is the caller's."""
        bs = self.block_size
        if seq.length % bs and self.refs[seq.blocks[-1]] > 1:
            (own,) = self.allocate(1)
            self.copy_block(seq.blocks[-1], own)
            self.release([seq.blocks[-1]])
            seq.blocks[-1] = own
        need = -(-(seq.length + n_new) // bs) - len(seq.blocks)
        if need > 0:
            seq.blocks += self.allocate(need)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for t in self.k + self.v:
            t[dst * bs : (dst + 1) * bs] = t[src * bs : (src + 1) * bs]

"""Decode batches captured as CUDA graphs, one per batch-size bucket (the `cuda_graphs` fusion):
one graph launch instead of hundreds of kernel launches per step.

A batch of B sequences runs the graph of the smallest bucket >= B, its rows past B padded: a
padded row decodes token 0 at position 0 of the scratch block (kv_pool.SCRATCH_BLOCK), which no
sequence owns, and its logits are not returned. Before a replay the host writes the step's
tokens, positions, slots and lengths into the bucket's static buffers in one copy, and the
block tables in a second copy only when they changed (a sequence took a new block or the
batch's sequences changed). All buckets share one memory pool (they never run at once), and
the captured kernels read the KV pool's tensors: when the pool grows (its tensors move) every
graph is captured again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence as Seq

import torch

from kiln.runtime.batch import ForwardBatch
from kiln.runtime.kv_pool import SCRATCH_BLOCK, KVPool, Sequence

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# MoE layers above 8 rows run paths (the per-slot expert mat-vecs past their tuned size, the
# grouped GEMM's device-side plan) that no GPU run has captured yet: their batches stay eager.
MOE_MAX_BUCKET = 8
# Buckets up to this size have been captured on every GPU run: a capture failing there is a bug
# (raised); above it the batch falls back to eager launches, said once.
PROVEN_BUCKET = 8


def buckets_for(n_seq: int, moe: bool) -> tuple[int, ...]:
    """The batch-size buckets an engine of n_seq sequences captures: BUCKETS (up to
    MOE_MAX_BUCKET for a MoE model) below n_seq, and the first one that holds n_seq (batches past
    the last bucket run eagerly). Above 8 rows a decode step launched eagerly costs the host more
    than the GPU: ITL 46 ms at 32 concurrent streams of qwen3-8b Q4_K_M (H100, `kiln serve`,
    session 11) where its kernels take about 15 ms."""
    top = [b for b in BUCKETS if not moe or b <= MOE_MAX_BUCKET]
    holds = next((b for b in top if b >= n_seq), None)
    return tuple(b for b in top if holds is None or b <= holds)


def capture(
    model, batch: ForwardBatch, pool: KVPool, mempool
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """model.forward(batch, pool) captured as a CUDA graph in the memory pool `mempool` ->
    (the graph, its logits buffer). Two forwards on a side stream first compile the kernels and
    settle the allocator; they write their K/V to the batch's slots like the graph's replays."""
    device = model.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            model.forward(batch, pool)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool):
        logits = model.forward(batch, pool)
    return graph, logits


class _Bucket:
    def __init__(self, model, pool: KVPool, size: int, mempool) -> None:
        device = model.device
        self.size = size
        width = pool.blocks_per_seq
        self.ints = torch.zeros((4, size), dtype=torch.int64, device=device)
        self.ints[2] = SCRATCH_BLOCK * pool.block_size  # slots
        self.ints[3] = 1  # seq_lens
        self.tables = torch.full((size, width), SCRATCH_BLOCK, dtype=torch.int32, device=device)
        self.host_tables: list[list[int]] | None = None  # the block lists last copied
        # pinned staging: the copies are queued without waiting for the GPU; `copied` marks
        # when the last one has been read, so a caller that decodes ahead without reading the
        # logits (a benchmark) never overwrites staged values still to be copied
        self.ints_staged = torch.empty((4, size), dtype=torch.int64).pin_memory()
        self.tables_staged = torch.empty((size, width), dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()
        self.staged = self.ints_staged.numpy()
        self.rows = -1  # the row count of the last replay (rows past it are padding)
        self.batch = ForwardBatch(
            tokens=self.ints[0],
            positions=self.ints[1],
            slots=self.ints[2],
            block_tables=self.tables,
            seq_lens=self.ints[3],
            query_start=torch.arange(size + 1, dtype=torch.int64, device=device),
            logit_rows=None,
            query_lens=(1,) * size,
            kv_lens=(1,) * size,
            first_rows=(None,) * size,
            block_size=pool.block_size,
        )
        self.graph, self.logits = capture(model, self.batch, pool, mempool)

    def replay(self, tokens: Seq[int] | torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        # host work here is on every decoded token's critical path (the sampler waits for the
        # logits): numpy writes into the pinned buffer, no tensor built per step
        n, bs = len(seqs), self.batch.block_size
        on_device = isinstance(tokens, torch.Tensor)  # copied in after the staged values
        self.copied.synchronize()
        staged = self.staged
        for i, seq in enumerate(seqs):
            p = seq.length
            staged[0, i] = 0 if on_device else tokens[i]
            staged[1, i] = p
            staged[2, i] = seq.blocks[p // bs] * bs + p % bs
            staged[3, i] = p + 1
        if n != self.rows:  # padded rows: token 0 at position 0 of the scratch block
            staged[:, n:] = ((0,), (0,), (SCRATCH_BLOCK * bs,), (1,))
            self.rows = n
        self.ints.copy_(self.ints_staged, non_blocking=True)
        if on_device:
            self.ints[0, :n].copy_(tokens)
        blocks = [seq.blocks for seq in seqs]
        if blocks != self.host_tables:
            tables = self.tables_staged.numpy()
            tables[:] = SCRATCH_BLOCK
            for i, row in enumerate(blocks):
                tables[i, : len(row)] = row
            self.tables.copy_(self.tables_staged, non_blocking=True)
            self.host_tables = [list(row) for row in blocks]
        self.copied.record()
        self.graph.replay()
        return self.logits[:n]


class GraphRunner:
    def __init__(self, model, pool: KVPool, buckets: tuple[int, ...] = BUCKETS):
        self.model, self.pool, self.buckets = model, pool, buckets
        self.max_batch = buckets[-1]
        self._graphs: dict[int, _Bucket] = {}
        self.failed: dict[int, str] = {}  # bucket -> why its capture failed (runs eagerly)
        self._generation = pool.generation
        self._mempool = None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def serves(self, n: int) -> bool:
        """Whether a batch of n rows replays a graph (else the caller runs it eagerly): n fits
        a bucket whose capture has not failed."""
        return n <= self.max_batch and self.bucket(n) not in self.failed

    def __call__(self, tokens: Seq[int] | torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor | None:
        """One decode token for each of len(seqs) <= max_batch sequences (their blocks
        reserved, lengths not yet advanced; tokens on the host or the device) -> logits
        float32 [B, n_vocab]: a view of a buffer the next replay overwrites; None where the
        bucket's capture failed (above PROVEN_BUCKET rows: said once on stderr, and the caller
        runs the batch eagerly from then on)."""
        if self.pool.generation != self._generation:  # the pool grew: its tensors moved
            self._graphs.clear()
            self._generation = self.pool.generation
            # With its last graph gone the allocator frees the private pool; capturing into the
            # old handle then fails an internal assert (seen on an H200, torch 2.11).
            self._mempool = None
        size = self.bucket(len(seqs))
        graph = self._graphs.get(size)
        if graph is None:
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            try:
                graph = self._graphs[size] = _Bucket(self.model, self.pool, size, self._mempool)
            except RuntimeError as e:  # an op of this batch size that a graph cannot hold
                if size <= PROVEN_BUCKET:
                    raise
                self.failed[size] = f"{type(e).__name__}: {e}".splitlines()[0]
                print(
                    f"kiln: batches of {size} rows run without a CUDA graph (its capture "
                    f"failed: {self.failed[size]})",
                    file=sys.stderr,
                )
                return None
        return graph.replay(tokens, seqs)

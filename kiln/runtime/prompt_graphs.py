"""Prompt micro-batches captured as CUDA graphs (the `prompt_graphs` fusion): a forward of one
sequence's full micro-batch (T = the engine's ubatch tokens) replays one graph instead of
launching its few hundred kernels one by one from Python.

On a small model that launching is the prompt's cost: qwen3-0.6b Q8_0's pp512 forward took
31.2 ms of wall time for 3.4 ms of kernels (H100, session 17; scripts/profile_prompt.py).
Only full micro-batches are captured: every long prompt is cut into them (Engine.prefill,
`kiln bench`'s pp, the server's prompt chunks), they need no padding rows, and one graph per
logits form ("last": the last token's logits; "none": a chunk nobody reads the logits of)
serves every depth. The tokens, positions, slots, block table and length are the graph's
static buffers, written before each replay; the kernels read them on the device (the triton
backend's prompt path has no host synchronization and takes its launch parameters from shapes:
kiln/ops/triton_backend.py). At capture the chunk writes its K/V to the scratch block
(kv_pool.SCRATCH_BLOCK), which no sequence owns. A capture that fails (an op a graph cannot
hold) is said once, and prompts then run eagerly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence as Seq

import numpy as np
import torch

from kiln.runtime.batch import ForwardBatch
from kiln.runtime.graphs import capture
from kiln.runtime.kv_pool import SCRATCH_BLOCK, KVPool, Sequence

FORMS = ("last", "none")  # the logits forms a graph serves ("all": prompts whose every row is read)


class _PromptGraph:
    def __init__(self, model, pool: KVPool, tokens: int, logits: str, mempool) -> None:
        device, bs, width = model.device, pool.block_size, pool.blocks_per_seq
        self.tokens, self.block_size = tokens, bs
        rows = torch.arange(tokens, dtype=torch.int64)
        scratch = torch.stack([torch.zeros_like(rows), rows, SCRATCH_BLOCK * bs + rows % bs])
        self.ints = scratch.to(device)  # tokens, positions, slots
        self.seq_len = torch.full((1,), tokens, dtype=torch.int64, device=device)
        self.table = torch.full((1, width), SCRATCH_BLOCK, dtype=torch.int32, device=device)
        # pinned staging, as the decode graphs' (graphs._Bucket): `copied` marks when the last
        # copy has been read, so staged values still to be copied are never overwritten
        self.ints_staged = torch.empty((3, tokens), dtype=torch.int64).pin_memory()
        self.len_staged = torch.empty(1, dtype=torch.int64).pin_memory()
        self.table_staged = torch.empty((1, width), dtype=torch.int32).pin_memory()
        self.copied = torch.cuda.Event()
        last = torch.tensor([tokens - 1], dtype=torch.int64, device=device)
        batch = ForwardBatch(
            tokens=self.ints[0],
            positions=self.ints[1],
            slots=self.ints[2],
            block_tables=self.table,
            seq_lens=self.seq_len,
            query_start=torch.tensor([0, tokens], dtype=torch.int64, device=device),
            logit_rows=last if logits == "last" else last[:0],
            query_lens=(tokens,),
            kv_lens=(tokens,),
            first_rows=(None,),
            block_size=bs,
        )
        self.graph, self.logits = capture(model, batch, pool, mempool)

    def replay(self, seq: Sequence, ids: Seq[int]) -> torch.Tensor:
        """The chunk ids of seq (its blocks reserved, its length not yet advanced) -> its logits:
        a copy (the next replay overwrites the graph's buffer)."""
        bs, start = self.block_size, seq.length
        self.copied.synchronize()
        staged = self.ints_staged.numpy()
        staged[0] = ids
        positions = staged[1]
        positions[:] = np.arange(start, start + self.tokens)
        blocks = np.asarray(seq.blocks, dtype=np.int64)
        staged[2] = blocks[positions // bs] * bs + positions % bs
        self.len_staged[0] = start + self.tokens
        table = self.table_staged.numpy()
        table[:] = SCRATCH_BLOCK
        table[0, : len(blocks)] = blocks
        self.ints.copy_(self.ints_staged, non_blocking=True)
        self.seq_len.copy_(self.len_staged, non_blocking=True)
        self.table.copy_(self.table_staged, non_blocking=True)
        self.copied.record()
        self.graph.replay()
        return self.logits.clone()


class PromptGraphs:
    """The prompt graphs of an engine: one per logits form, for chunks of `tokens` tokens."""

    def __init__(self, model, pool: KVPool, tokens: int):
        self.model, self.pool, self.tokens = model, pool, tokens
        self._graphs: dict[str, _PromptGraph] = {}
        self.failed: str | None = None  # why a capture failed (prompts then run eagerly)
        self._generation = pool.generation
        self._mempool = None

    def serves(self, entries: Seq[tuple[Sequence, Seq[int]]], logits: str) -> bool:
        """Whether this forward replays a graph: one sequence's chunk of exactly `tokens` ids
        whose logits are the last token's or none, and no capture has failed."""
        return (
            self.failed is None
            and len(entries) == 1
            and len(entries[0][1]) == self.tokens
            and logits in FORMS
        )

    def __call__(self, seq: Sequence, ids: Seq[int], logits: str) -> torch.Tensor | None:
        """The chunk's forward (see serves; seq's blocks reserved, its length not yet advanced)
        -> its logits, or None where the capture failed (the caller runs it eagerly)."""
        if self.pool.generation != self._generation:  # the pool grew: its tensors moved
            self._graphs.clear()
            self._generation, self._mempool = self.pool.generation, None
        graph = self._graphs.get(logits)
        if graph is None:
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            try:
                graph = _PromptGraph(self.model, self.pool, self.tokens, logits, self._mempool)
            except RuntimeError as e:  # an op of the prompt path that a graph cannot hold
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
                print(
                    f"kiln: prompts run without a CUDA graph (its capture failed: {self.failed})",
                    file=sys.stderr,
                )
                return None
            self._graphs[logits] = graph
        return graph.replay(seq, ids)

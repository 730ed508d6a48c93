"""ForwardBatch: what one forward pass runs, built on the host once per step.

The tokens of every sequence in the step lie side by side, each sequence's contiguous (a prompt
chunk of many tokens beside decode tokens of one): T tokens of B sequences. The model reads the
device tensors; the host fields (`query_lens`, `kv_lens`, ...) are for shape decisions and for
the reference ops, never read by a kernel. In a captured CUDA graph the device tensors are the
graph's static buffers, refilled before each replay; the host fields then describe the captured
shapes only (kv_lens and first_rows are those of the capture: only reference ops read them, and
the reference is never captured).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from kiln.runtime.kv_pool import SCRATCH_BLOCK, Sequence


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    tokens: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]: each token's position in its sequence
    slots: torch.Tensor  # int64 [T]: the pool row its K/V is written to
    block_tables: torch.Tensor  # int32 [B, NB]: each sequence's blocks (0-padded)
    seq_lens: torch.Tensor  # int64 [B]: each sequence's KV length after this step
    query_start: torch.Tensor  # int64 [B + 1]: sequence b's tokens are rows query_start[b]..[b+1]-1
    logit_rows: torch.Tensor | None  # int64 [R]: the rows whose logits are returned (None: all)
    query_lens: tuple[int, ...]  # host: tokens of each sequence in this step
    kv_lens: tuple[int, ...]  # host: seq_lens
    first_rows: tuple[int | None, ...]  # host: pool row of position 0 when contiguous
    block_size: int

    @property
    def decode(self) -> bool:
        """Every sequence runs one token (flash-decoding serves the attention)."""
        return all(n == 1 for n in self.query_lens)

    @property
    def n_tokens(self) -> int:
        return sum(self.query_lens)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (nested lists) as a tensor on `device`. On a GPU through pinned memory and a
    queued copy: a copy from pageable memory makes the host wait until the device has run all
    it was given, which would stall a step launched behind one still running (the server's
    overlap)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def build_batch(
    entries: Seq[tuple[Sequence, Seq[int]]],
    device: torch.device,
    logits: str = "last",
    n_blocks: int | None = None,
) -> ForwardBatch:
    """entries: (sequence, its new token ids) in order; the sequences' blocks are reserved and
    their lengths not yet advanced. logits: "last" (each sequence's last token), "all" or
    "none" (a prompt chunk whose logits nobody reads). n_blocks: the block table's width
    (default: the most any sequence uses)."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    query_lens, kv_lens, first_rows = [], [], []
    for seq, ids in entries:
        start = seq.length
        n = len(ids)
        tokens += ids
        positions += range(start, start + n)
        slots += [seq.slot(p) for p in range(start, start + n)]
        query_lens.append(n)
        kv_lens.append(start + n)
        first_rows.append(seq.first_row())
        rows.append(len(tokens) - 1)
    width = n_blocks or max(len(seq.blocks) for seq, _ in entries)
    table = [seq.blocks + [SCRATCH_BLOCK] * (width - len(seq.blocks)) for seq, _ in entries]
    ints = to_device([tokens, positions, slots], torch.int64, device)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    if logits == "all":
        logit_rows = None
    elif logits == "last":
        logit_rows = None if len(rows) == len(tokens) else to_device(rows, torch.int64, device)
    else:
        logit_rows = torch.empty(0, dtype=torch.int64, device=device)
    pool = entries[0][0].pool
    return ForwardBatch(
        tokens=ints[0],
        positions=ints[1],
        slots=ints[2],
        block_tables=to_device(table, torch.int32, device),
        seq_lens=to_device(kv_lens, torch.int64, device),
        query_start=to_device(starts, torch.int64, device),
        logit_rows=logit_rows,
        query_lens=tuple(query_lens),
        kv_lens=tuple(kv_lens),
        first_rows=tuple(first_rows),
        block_size=pool.block_size,
    )

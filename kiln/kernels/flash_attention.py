"""Launcher of causal flash attention for prompts over the paged KV pool
(kernels/triton/flash_attention.py): asserts, allocates, picks a config and the grid.

    attention_prefill(q: [T, H, D], k_pool: [S, Hkv, D], v_pool: [S, Hkv, Dv],
                      block_tables: int32 [B, NB], seq_lens: int64 [B],
                      query_start: int64 [B + 1], positions: int64 [T], block_size,
                      max_query_len, scale, config=None, pdl=False) -> f32 [T, H, Dv]

Its reference is kiln.ops.reference.attention (over a ForwardBatch holding the same tensors). The
T queries of B sequences lie side by side, sequence b's in rows query_start[b] ..
query_start[b + 1] - 1 (a prompt chunk of many, a decode token of one: mixed batches are one
launch); query t attends to positions 0 .. positions[t] of its sequence (clamped to seq_lens[b]
- 1), whose K/V the caller has written into the pool already (qkv_norm_rope), at any depth:
positions need not start at 0. Pool layout and block tables as in kiln/kernels/attention.py.

No host synchronization: query_start, positions, seq_lens and block_tables are read on the
device only. The grid follows from the shapes and one host number, max_query_len (the caller's
bound on any sequence's query count, e.g. max(ForwardBatch.query_lens)): (Hkv, n_tiles) with

    n_tiles = min((T * G + B * (R - 1)) // R, B * ceil(max_query_len * G / R))

an upper bound of sum_b ceil(n_b * G / R), the tiles of R (token, query head) rows (G = H / Hkv).
Each program finds its sequence and tile from query_start itself (one vector load and a prefix
sum; see the kernel), instead of a tile table built before the launch by a few torch ops (4-5
more launches per layer) or a grid of B * ceil(max_query_len * G / R) programs per KV head (a
512-token chunk beside 64 decode tokens, G = 4, R = 128: 1040 programs for 80 tiles, where the
bound above gives 82). The programs past the real tile count return after that load.

One launch per call; the output is allocated by shape (fine inside a CUDA-graph capture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kiln.kernels import cdiv, next_power_of_2, pdl_launch
from kiln.kernels.attention import TL_DTYPES, check_paged
from kiln.kernels.triton import flash_attention as _k

# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._flash_attention_kernel).__name__ == "InterpretedFunction"
SHARED_LIMIT = 227 * 1024  # an H100's shared memory per block


@dataclass(frozen=True)
class FlashConfig:
    block_r: int = 128  # (token, query head) rows per program: the MMAs' M (power of 2, >= 16)
    block_n: int = 64  # keys per step (power of 2, >= 16; capped at the block size)
    num_warps: int = 8
    num_stages: int = 3  # K/V steps in flight + 1, as in attention.py (see _triton_stages)


def default_config(head_dim: int, head_dim_v: int, dtype: torch.dtype) -> FlashConfig:
    """Untuned; sized for an H100 by compiling for sm_90 (ptxas -v, bf16):
    - head sizes up to 128: 128 rows x 64 keys on 8 warps. At D = Dv = 128: 247 registers a
      thread, no spills, 128 KB of shared memory (q, and 3 K/V buffers: 2 steps in flight);
    - above (256): 64 rows x 32 keys on 8 warps: 255 registers with 28 bytes spilled (the fp32
      accumulator alone is 64 registers a thread; 64 x 64 spilled 136 bytes, 4 warps 412 bytes),
      128 KB of shared memory;
    - fp32 caches (tests) multiply on CUDA cores (FMA, no tensor cores): 32 rows on 4 warps,
      32 keys a step (16 above head size 128), 2 stages.
    benchmarks/flash_attention.py --sweep times the alternatives on a GPU."""
    wide = max(head_dim, head_dim_v) > 128
    cfg = FlashConfig(64, 32, 8, 3) if wide else FlashConfig()
    if dtype == torch.float32:
        cfg = FlashConfig(32, 16 if wide else 32, 4, 2)
    return cfg


def _triton_stages(num_stages: int) -> int:
    """Triton's num_stages for config.num_stages = n: as in attention.py, the block-table load
    feeds the K/V loads and Triton's pipeliner splits num_stages - 1 between the two levels of
    that chain, so 2n - 1 keeps n - 1 K/V steps in flight."""
    return 2 * num_stages - 1


def n_tiles(n_tokens: int, n_seqs: int, group: int, max_query_len: int, block_r: int) -> int:
    """The grid's axis 1: an upper bound of the tiles of block_r rows over all sequences."""
    by_tokens = (n_tokens * group + n_seqs * (block_r - 1)) // block_r
    return min(by_tokens, n_seqs * cdiv(max_query_len * group, block_r))


def attention_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    max_query_len: int,
    scale: float,
    config: FlashConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """q: [T, H, D], query t of sequence b (rows query_start[b]..query_start[b+1]-1) attending to
    positions 0..positions[t] of sequence b in the paged k_pool/v_pool ([S, Hkv, D] /
    [S, Hkv, Dv]; blocks block_tables[b] of block_size rows) -> f32 [T, H, Dv]."""
    paged = check_paged(q, k_pool, v_pool, block_tables, block_size, "T")
    n_head, n_kv, head_dim, dv = paged.n_head, paged.n_kv, paged.head_dim, paged.dv
    n_tok = q.shape[0]
    group = n_head // n_kv
    n_seq = block_tables.shape[0]
    assert seq_lens.dtype == torch.int64 and tuple(seq_lens.shape) == (n_seq,), (
        f"seq_lens must be int64 [B={n_seq}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}"
    )
    assert query_start.dtype == torch.int64 and tuple(query_start.shape) == (n_seq + 1,), (
        f"query_start must be int64 [B + 1 = {n_seq + 1}]; got {query_start.dtype} "
        f"{tuple(query_start.shape)}"
    )
    assert positions.dtype == torch.int64 and tuple(positions.shape) == (n_tok,), (
        f"positions must be int64 [T={n_tok}]; got {positions.dtype} {tuple(positions.shape)}"
    )
    assert query_start.is_contiguous() and positions.is_contiguous() and seq_lens.is_contiguous()
    assert 1 <= max_query_len <= max(n_tok, 1), (
        f"max_query_len must be in 1..T={n_tok}; got {max_query_len}"
    )
    dev = q.device
    for name, t in (
        ("k_pool", k_pool),
        ("v_pool", v_pool),
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("query_start", query_start),
        ("positions", positions),
    ):
        assert t.device == dev, f"q on {dev}, {name} on {t.device}"
    cfg = config or default_config(head_dim, dv, paged.products_dtype)
    for what in ("block_r", "block_n"):
        v = getattr(cfg, what)
        assert v >= 16 and v & (v - 1) == 0, f"{what} must be a power of 2 >= 16; got {v}"

    out = torch.empty((n_tok, n_head, dv), dtype=torch.float32, device=dev)
    if n_tok == 0:
        return out
    n_blocks = block_tables.shape[1]
    block_n = min(cfg.block_n, block_size)  # a step stays inside one block
    grid = (n_kv, n_tiles(n_tok, n_seq, group, max_query_len, cfg.block_r))
    _k._flash_attention_kernel[grid](
        q,
        paged.k,
        paged.v,
        block_tables,
        seq_lens,
        query_start,
        positions,
        out,
        scale * math.log2(math.e),
        n_seq,
        n_blocks,
        block_tables.stride(0),
        n_head,
        paged.k.stride(0),
        paged.v.stride(0),
        GROUP=group,
        D=head_dim,
        D_PAD=max(16, next_power_of_2(head_dim)),
        DV=dv,
        DV_PAD=max(16, next_power_of_2(dv)),
        BLOCK_R=cfg.block_r,
        BLOCK_N=block_n,
        KV_BLOCK=block_size,
        B_PAD=max(16, next_power_of_2(n_seq)),
        DT=TL_DTYPES[paged.products_dtype],
        PRECISION=paged.precision,
        K_FMT=paged.k_fmt,
        V_FMT=paged.v_fmt,
        V_ROT=paged.v_rot,
        INTERP_KEYS=n_blocks * block_size if _INTERPRETED else 0,
        num_warps=cfg.num_warps,
        num_stages=_triton_stages(cfg.num_stages),
        **pdl_launch(pdl),
    )
    return out

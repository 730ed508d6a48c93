"""Launcher of the int8 tensor-core GEMM over q8_1 activations (kernels/triton/matmul_q8.py).

    matmul_q8(x: Q8_1 [M, K], weight: Weight [N, K]) -> [M, N] float32

Its reference is kiln.ops.reference.linear(q8_1.dequantize(x), weight), as the int8 mat-vec's
(kiln/kernels/matvec_q8.py): the integer dot products are exact, so the two differ only by the
fp32 rounding of the group scales' products and the summation order.

Where it runs instead of the int8 mat-vec (kernels/linear.py reads Q8_BATCH_METHOD) is a
measured choice per GPU; until it has been timed against the mat-vec on one, nothing routes to
it by default (docs/performance.md says what was measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.kernels import cdiv, pdl_launch
from kiln.kernels.formats import FORMAT_IDS, SUPPORT
from kiln.kernels.matvec_q8 import check_dense_input
from kiln.kernels.triton import matmul_q8 as _k
from kiln.quant.q8_1 import Q8_1
from kiln.weight import Weight


@dataclass(frozen=True)
class MatmulQ8Config:
    block_n: int  # weight rows a program (>= 16; 64 per warpgroup for wgmma)
    block_m: int  # x rows a program (>= 16: the int8 dot's smallest tile)
    groups: int  # groups of 32 values a K step
    num_warps: int
    splits: int | None = None  # K ranges run by programs of their own; None: auto_splits


# Programs a launch aims at with split-K (auto_splits): about 4 an SM of an H100.
TARGET_PROGRAMS = 512


def default_config(m: int) -> MatmulQ8Config:
    """Untuned: 32 weight rows and 16 x rows (a decode batch in one row tile) a program, 4
    groups (128 values) a step, one warp (sm_90 K loop at these sizes, instructions a weight value
    and thread: Q4_K 8.1, Q6_K 25.0, Q8_0 4.9), K split as auto_splits says."""
    return MatmulQ8Config(block_n=32, block_m=16 if m <= 16 else 32, groups=4, num_warps=1)


def auto_splits(tiles: int, groups: int, cfg: MatmulQ8Config) -> int:
    """K splits that bring tiles * splits up to TARGET_PROGRAMS, each split at least 4 steps."""
    steps = cdiv(groups, cfg.groups)
    want = cdiv(TARGET_PROGRAMS, tiles)
    return max(1, min(want, steps // 4))


def reads(weight: Weight) -> bool:
    """Whether this kernel reads the weight: a 2-D weight of SUPPORT["matmul_q8"]."""
    return (
        len(weight.shape) == 2 and weight.raw is not None and weight.qtype in SUPPORT["matmul_q8"]
    )


def matmul_q8(
    x: Q8_1, weight: Weight, config: MatmulQ8Config | None = None, pdl: bool = False
) -> torch.Tensor:
    """x: q8_1 [M, K] -> [M, N] float32 = dequantize(x) @ W.T."""
    m, n = check_dense_input(x, weight, "matmul_q8")
    assert m >= 1, "matmul_q8 needs at least one row"
    raw = weight.raw
    assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride(1) == 1
    out = torch.empty((m, n), dtype=torch.float32, device=x.qs.device)
    launch(x, weight.qtype, raw, out, config or default_config(m), pdl=pdl)
    return out


def launch(
    x: Q8_1,
    qtype: GGMLQuantizationType,
    raw: torch.Tensor,
    out: torch.Tensor,
    cfg: MatmulQ8Config,
    pdl: bool = False,
) -> None:
    """One launch for checked inputs (a second, torch's sum, with split-K): raw is the weight's
    bytes [N, row_bytes]."""
    m, k = x.shape
    n = raw.shape[0]
    groups = k // 32
    tiles = cdiv(n, cfg.block_n) * cdiv(m, cfg.block_m)
    splits = cfg.splits or auto_splits(tiles, groups, cfg)
    split_groups = cdiv(cdiv(groups, splits), cfg.groups) * cfg.groups
    splits = cdiv(groups, split_groups)  # none empty
    part = out if splits == 1 else torch.empty((splits, m, n), dtype=out.dtype, device=out.device)
    grid = (cdiv(n, cfg.block_n), cdiv(m, cfg.block_m), splits)
    _k._matmul_q8_kernel[grid](
        x.qs,
        x.ds,
        raw,
        part,
        m,
        n,
        k,
        raw.stride(0),
        n,
        FMT=FORMAT_IDS[qtype],
        TYPE_SIZE=GGML_QUANT_SIZES[qtype][1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        GROUPS=cfg.groups,
        SPLIT_GROUPS=split_groups,
        EVEN_K=groups % split_groups == 0,
        num_warps=cfg.num_warps,
        **pdl_launch(pdl),
    )
    if splits > 1:
        torch.sum(part, dim=0, out=out)

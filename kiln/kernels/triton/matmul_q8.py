"""The int8 tensor-core GEMM over q8_1 activations: out[M, N] = x[M, K] @ W[N, K]^T with x in q8_1
(kiln/quant/q8_1.py: int8 quants, a float32 d and s = d * sum(q) per 32 values) and W in its
GGUF blocks, for batches of rows where the int8 mat-vec (matvec_q8.py: dp4a, one weight pass
per program with M_PAD accumulators a lane) runs out of registers and issue slots: batched
decode at M = 2..8 (issue 11's npl goal) and up. This is what llama.cpp's MMQ does with
`mma.sync` int8 tiles.

Every weight format here is affine per group of 32 values: w = s * q + o with q a small integer
(Q8_0: int8; Q4_0: nibble - 8; Q4_1: nibble, o = m; Q5_0: 5 bits - 16; Q5_1: 5 bits, o = m;
Q4_K: nibble, s = d * sc, o = -dmin * min; Q5_K: 5 bits, as Q4_K), so a group's contribution is

    sum_i w_i x_i = s * d_x * dot(q, q_x) + o * s_x        (s_x = d_x * sum(q_x), q8_1's s)

and dot(q, q_x) is an exact int32 product of two int8 tiles on the tensor cores (`tl.dot` with
int8 operands and int32 accumulation: mma.sync m16n8k32 / wgmma .s8 on sm_90; int8 dots need
K >= 32, so one dot a group). Q6_K has a scale per 16 values and no offset: a group is two dots
of x with one half zeroed (q - 32 in [-32, 31]).

Layout: a program owns BLOCK_N weight rows and BLOCK_M (>= 16) rows of x; acc[BLOCK_N, BLOCK_M]
fp32 = W_tile @ x_tile^T (the decoded weight as the left operand, as the bf16 GEMM's SWAP_AB: it
needs no trip through shared memory for wgmma). The K loop steps GROUPS groups of 32 at a time,
each group decoded from its bytes to int8 [BLOCK_N, 32] in registers (one byte load a value;
the formats' bit layouts as kernels/triton/dequant.py reads them). Rows past M and N are
clamped to M - 1 and N - 1 (no masks on the loads); only the store is masked. K is a whole
number of format blocks (as the mat-vec requires); a step past the last group reads group 0
and scales it by 0.

Split-K (program_id(2)): a decode-sized N gives too few [BLOCK_N, BLOCK_M] tiles to keep an
H100's 132 SMs reading, so K is cut into SPLITS ranges of SPLIT_GROUPS groups, each program
writes its partial sums, and the launcher adds them in split order (no atomics: the result does
not depend on the scheduling).

Under TRITON_INTERPRET the int8 dot runs as numpy's, exact as the tensor cores' is.

Only @triton.jit functions live here; kiln/kernels/matmul_q8.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.dequant import (
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    _f16_at,
    _scale_min_k4,
)
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _group_ints(rows, g, FMT: tl.constexpr, TYPE_SIZE: tl.constexpr):
    """rows: uint8 pointers [BLOCK_N, 1] to weight rows; g: group of 32 values (scalar) ->
    (q int8 [BLOCK_N, 32], s fp32 [BLOCK_N, 1], o fp32 [BLOCK_N, 1]) with w = s * q + o, except
    Q6_K: (q, s of values 0..15, s of values 16..31)."""
    j = tl.arange(0, 32)[None, :]
    if FMT == Q6_K:
        blk = rows + (g // 8) * TYPE_SIZE
        sb = g % 8  # sub-block of 32
        h = sb // 4
        qq = sb % 4
        ql = (tl.load(blk + 64 * h + 32 * (qq % 2) + j) >> ((qq // 2) * 4)) & 0x0F
        qh = (tl.load(blk + 128 + 32 * h + j) >> (2 * qq)) & 3
        q = (ql | (qh << 4)).to(tl.int32) - 32
        d = _f16_at(blk + 208)
        lo = tl.load(blk + 192 + 2 * sb).to(tl.int8, bitcast=True).to(tl.float32)
        hi = tl.load(blk + 193 + 2 * sb).to(tl.int8, bitcast=True).to(tl.float32)
        return q.to(tl.int8), d * lo, d * hi
    elif FMT == Q4_K or FMT == Q5_K:
        blk = rows + (g // 8) * TYPE_SIZE
        sb = g % 8
        d = _f16_at(blk)
        dmin = _f16_at(blk + 2)
        sc, mn = _scale_min_k4(blk, sb)
        if FMT == Q4_K:
            q = (tl.load(blk + 16 + 32 * (sb // 2) + j) >> ((sb % 2) * 4)) & 0x0F
        else:
            ql = (tl.load(blk + 48 + 32 * (sb // 2) + j) >> ((sb % 2) * 4)) & 0x0F
            q = ql | (((tl.load(blk + 16 + j) >> sb) & 1) << 4)
        return q.to(tl.int8), d * sc, -(dmin * mn)
    else:
        blk = rows + g * TYPE_SIZE
        d = _f16_at(blk)
        nib_byte = j % 16
        nib_shift = (j // 16) * 4
        o = d  # unused: no offset (the kernel skips it)
        if FMT == Q8_0:
            q = tl.load(blk + 2 + j).to(tl.int8, bitcast=True).to(tl.int32)
        elif FMT == Q4_0:
            q = ((tl.load(blk + 2 + nib_byte) >> nib_shift) & 0x0F).to(tl.int32) - 8
        elif FMT == Q4_1:
            o = _f16_at(blk + 2)
            q = (tl.load(blk + 4 + nib_byte) >> nib_shift) & 0x0F
        elif FMT == Q5_0:
            hb = (tl.load(blk + 2 + j // 8) >> (j % 8)) & 1
            q = (((tl.load(blk + 6 + nib_byte) >> nib_shift) & 0x0F) | (hb << 4)).to(tl.int32)
            q = q - 16
        else:  # Q5_1
            o = _f16_at(blk + 2)
            hb = (tl.load(blk + 4 + j // 8) >> (j % 8)) & 1
            q = ((tl.load(blk + 8 + nib_byte) >> nib_shift) & 0x0F) | (hb << 4)
        return q.to(tl.int8), d, o


@triton.jit
def _matmul_q8_kernel(
    xq_ptr,  # int8 [M, K]: q8_1 quants
    xds_ptr,  # fp32 [M, K // 32, 2]: q8_1 (d, s)
    w_ptr,  # uint8 [N, row_bytes]
    out_ptr,  # fp32 [SPLITS, M, N]: split k's partial sums at out_ptr + k * M * N
    M,
    N,
    K,
    stride_w,
    stride_out,
    FMT: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,  # groups of 32 values a K step
    SPLIT_GROUPS: tl.constexpr,  # groups of each split of K (program_id(2)): GROUPS * steps
    EVEN_K: tl.constexpr,  # K // 32 is a multiple of SPLIT_GROUPS: no step runs past it
    PDL: tl.constexpr = False,
):
    if PDL:
        wait_for_inputs()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_w  # [BLOCK_N, 1]
    m_in = tl.minimum(m, M - 1)
    i = tl.arange(0, 32)[:, None]  # value of the group, along the x tile's rows
    x_cols = xq_ptr + m_in[None, :] * K + i  # [32, BLOCK_M]: x^T of group 0
    groups = K // 32
    xds_rows = xds_ptr + m_in * (2 * groups)  # [BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(SPLIT_GROUPS // GROUPS):
        g0 = pid_k * SPLIT_GROUPS + step * GROUPS
        for t in tl.static_range(GROUPS):
            g = g0 + t
            if EVEN_K:
                live = 1.0
            else:
                live = tl.where(g < groups, 1.0, 0.0)
                g = tl.where(g < groups, g, 0)
            xq = tl.load(x_cols + g * 32)  # int8 [32, BLOCK_M]
            xd = tl.load(xds_rows + 2 * g)[None, :] * live  # [1, BLOCK_M]
            q, s, o = _group_ints(rows, g, FMT, TYPE_SIZE)
            if FMT == Q6_K:
                zero = tl.zeros_like(xq)
                lo = tl.dot(q, tl.where(i < 16, xq, zero), out_dtype=tl.int32)
                hi = tl.dot(q, tl.where(i < 16, zero, xq), out_dtype=tl.int32)
                acc += (s * lo.to(tl.float32) + o * hi.to(tl.float32)) * xd
            elif FMT == Q4_1 or FMT == Q5_1 or FMT == Q4_K or FMT == Q5_K:
                dot = tl.dot(q, xq, out_dtype=tl.int32)  # [BLOCK_N, BLOCK_M]
                xs = tl.load(xds_rows + 2 * g + 1)[None, :] * live
                acc += s * (dot.to(tl.float32) * xd) + o * xs
            else:  # no offset
                dot = tl.dot(q, xq, out_dtype=tl.int32)
                acc += s * (dot.to(tl.float32) * xd)
    out = out_ptr + pid_k * M * stride_out + m[None, :] * stride_out + n[:, None]
    tl.store(out, acc, mask=(m[None, :] < M) & (n[:, None] < N))

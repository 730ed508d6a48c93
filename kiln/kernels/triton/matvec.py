"""Decode mat-vec straight from GGUF blocks: out[m, n] = sum_k x[m, k] * W[n, k], fp32 accumulation.

The weight is read in its stored format and dequantized in registers; the byte layouts are the ones
documented at the top of kiln/quant/legacy.py, k_quants.py and floats.py. Each program owns
BLOCK_N output rows and walks K one tile of [S, L] values at a time:
- float formats: S = 1, L = BLOCK_K values; w_ptr is typed (f32/f16/bf16), K is masked.
- legacy formats (32-value blocks): S = blocks per tile, L = 32; K is a whole number of blocks.
- K-quants (256-value super-blocks): one super-block per tile as [8, 32] (8 sub-blocks of 32).
Rows past N are clamped to N - 1 so weight loads need no mask; only the store is masked.

Only @triton.jit functions live here; kiln/kernels/matvec.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Format ids (the FMT constexpr); kiln/kernels/matvec.py maps GGML types onto these.
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)
Q8_0: tl.constexpr = tl.constexpr(3)
Q4_0: tl.constexpr = tl.constexpr(4)
Q4_1: tl.constexpr = tl.constexpr(5)
Q5_0: tl.constexpr = tl.constexpr(6)
Q5_1: tl.constexpr = tl.constexpr(7)
Q4_K: tl.constexpr = tl.constexpr(8)
Q5_K: tl.constexpr = tl.constexpr(9)
Q6_K: tl.constexpr = tl.constexpr(10)


@triton.jit
def _f16_at(p):
    """The little-endian f16 at byte pointer p, as fp32."""
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_legacy(blk, j, FMT: tl.constexpr):
    """blk: byte pointers [BLOCK_N, S, 1] to block starts; j: [1, 1, 32] value index in block
    -> fp32 [BLOCK_N, S, 32]."""
    nib_byte = j % 16
    nib_shift = (j // 16) * 4
    if FMT == Q8_0:
        d = _f16_at(blk)
        q = tl.load(blk + 2 + j).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * d
    elif FMT == Q4_0:
        d = _f16_at(blk)
        q = (tl.load(blk + 2 + nib_byte) >> nib_shift) & 0x0F
        w = d * (q.to(tl.float32) - 8.0)
    elif FMT == Q4_1:
        d = _f16_at(blk)
        m = _f16_at(blk + 2)
        q = (tl.load(blk + 4 + nib_byte) >> nib_shift) & 0x0F
        w = d * q.to(tl.float32) + m
    elif FMT == Q5_0:
        d = _f16_at(blk)
        hb = (tl.load(blk + 2 + j // 8) >> (j % 8)) & 1
        q = ((tl.load(blk + 6 + nib_byte) >> nib_shift) & 0x0F) | (hb << 4)
        w = d * (q.to(tl.float32) - 16.0)
    else:  # Q5_1
        d = _f16_at(blk)
        m = _f16_at(blk + 2)
        hb = (tl.load(blk + 4 + j // 8) >> (j % 8)) & 1
        q = ((tl.load(blk + 8 + nib_byte) >> nib_shift) & 0x0F) | (hb << 4)
        w = d * q.to(tl.float32) + m
    return w


@triton.jit
def _scale_min_k4(blk, s):
    """Q4_K/Q5_K 6-bit (scale, min) of sub-block s ([1, 8, 1]) of super-blocks at blk."""
    a = tl.load(blk + 4 + s)  # scales[s]
    b = tl.load(blk + 8 + s)  # scales[s + 4]
    c = tl.load(blk + 4 + tl.where(s >= 4, s - 4, s))  # scales[s - 4] (used for s >= 4)
    sc = tl.where(s < 4, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(s < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_k(blk, s, j, FMT: tl.constexpr):
    """blk: byte pointers [BLOCK_N, 1, 1] to super-block starts; s: [1, 8, 1] sub-block of 32;
    j: [1, 1, 32] -> fp32 [BLOCK_N, 8, 32] (value 32 * s + j)."""
    if FMT == Q6_K:
        h = s // 4
        qq = s % 4
        ql = (tl.load(blk + 64 * h + 32 * (qq % 2) + j) >> ((qq // 2) * 4)) & 0x0F
        qh = (tl.load(blk + 128 + 32 * h + j) >> (2 * qq)) & 3
        q = (ql | (qh << 4)).to(tl.int32) - 32
        sc = tl.load(blk + 192 + 2 * s + j // 16).to(tl.int8, bitcast=True).to(tl.float32)
        w = (_f16_at(blk + 208) * sc) * q.to(tl.float32)
    else:
        d = _f16_at(blk)
        dmin = _f16_at(blk + 2)
        sc, mn = _scale_min_k4(blk, s)
        if FMT == Q4_K:
            q = (tl.load(blk + 16 + 32 * (s // 2) + j) >> ((s % 2) * 4)) & 0x0F
        else:  # Q5_K
            ql = (tl.load(blk + 48 + 32 * (s // 2) + j) >> ((s % 2) * 4)) & 0x0F
            q = ql | (((tl.load(blk + 16 + j) >> s) & 1) << 4)
        w = (d * sc) * q.to(tl.float32) - dmin * mn
    return w


@triton.jit
def _matvec_kernel(
    x_ptr,  # [M, K] f32/f16/bf16, row stride stride_xm, unit stride along K
    w_ptr,  # float formats: typed [N, K]; block formats: uint8 [N, row_bytes]
    out_ptr,  # f32 [M, N], row stride stride_om
    M,
    N,
    K,
    stride_xm,
    stride_wn,  # in elements of w_ptr's type
    stride_om,
    K_INTERP: tl.constexpr,  # K as a constexpr under TRITON_INTERPRET, else 0 (see below)
    FMT: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,
    L: tl.constexpr,
    TYPE_SIZE: tl.constexpr,  # bytes per block (block formats)
    BLOCK_VALUES: tl.constexpr,  # values per block: 1 (floats), 32 (legacy), 256 (K-quants)
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    row_base = w_ptr + rows_c[:, None, None] * stride_wn  # [BLOCK_N, 1, 1]
    s3 = tl.arange(0, S)[None, :, None]
    l3 = tl.arange(0, L)[None, None, :]
    v3 = s3 * L + l3  # [1, S, L] value offset inside the tile
    m_idx = tl.arange(0, M_PAD)

    acc3 = tl.zeros([BLOCK_N, S, L], dtype=tl.float32)  # M == 1: one reduction at the end
    acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)  # M > 1: reduced per tile
    # Triton 3.6's interpreter holds a scalar argument as a 1-element array, which numpy >= 2.4
    # refuses to turn into a Python int for range(); there the launcher passes K as a constexpr.
    # Compiled kernels keep K a runtime value, so one binary serves every K.
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, S * L):
        k = k0 + v3
        if BLOCK_VALUES == 1:
            k_ok = k < K
            w = tl.load(row_base + k, mask=k_ok, other=0.0).to(tl.float32)
        elif BLOCK_VALUES == 32:
            k_ok = k < K  # K is whole blocks, but the last tile may overrun it
            blk = row_base + (k0 // 32 + s3).to(tl.int64) * TYPE_SIZE
            blk = tl.where(k0 + s3 * 32 < K, blk, row_base)  # overrun blocks read block 0
            w = tl.where(k_ok, _dequant_legacy(blk, l3, FMT), 0.0)
        else:
            k_ok = k < K
            blk = row_base + (k0 // 256) * TYPE_SIZE
            w = _dequant_k(blk, s3, l3, FMT)
        if M_PAD == 1:
            xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            acc3 += w * xv
        else:
            for m in tl.static_range(M_PAD):
                xv = tl.load(x_ptr + m * stride_xm + k, mask=k_ok & (m < M), other=0.0)
                p = tl.sum(tl.sum(w * xv.to(tl.float32), axis=2), axis=1)  # [BLOCK_N]
                acc += tl.where(m_idx[None, :] == m, p[:, None], 0.0)
    if M_PAD == 1:
        acc += tl.sum(tl.sum(acc3, axis=2), axis=1)[:, None]
    out = out_ptr + m_idx[None, :] * stride_om + rows[:, None]
    tl.store(out, acc, mask=row_ok[:, None] & (m_idx[None, :] < M))

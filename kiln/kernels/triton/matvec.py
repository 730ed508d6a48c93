"""Decode mat-vec straight from GGUF blocks: out[m, n] = sum_k x[m, k] * W[n, k], fp32 accumulation.

The weight is read in its stored format and dequantized in registers; the byte layouts are the ones
documented at the top of kiln/quant/legacy.py, k_quants.py and floats.py. Each program owns
BLOCK_N output rows and walks K one tile of [S, L] values at a time:
- float formats: S = 1, L = BLOCK_K values; w_ptr is typed (f32/f16/bf16), K is masked.
- legacy formats (32-value blocks): S = blocks per tile, L = 32; K is a whole number of blocks.
- K-quants (256-value super-blocks): one super-block per tile as [8, 32] (8 sub-blocks of 32).
Rows past N are clamped to N - 1 so weight loads need no mask; only the store is masked.

Every kernel also serves the MoE decode mat-vec (EXPERTS=True): w_ptr is then a stack of
[n_expert, N, row] weights and grid axis 1 runs over the k selected slots; the program of slot s
reads its expert id from ids_ptr[s] on the device (no host sync) and moves w_ptr, x_ptr and
out_ptr to that expert, x row (s, or 0 when every slot shares x: stride_xs = 0) and output row
before the K loop, which is the same code in both modes.

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
def _slot_pointers(w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os):
    """The pointers of grid column s = program_id(1) of an expert launch: expert ids_ptr[s]'s
    weights (64-bit offset: a stack of expert weights can exceed 2**31 elements), x row s (or
    row 0 when stride_xs = 0) and output row s."""
    slot = tl.program_id(1)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    return w_ptr + expert * stride_we, x_ptr + slot * stride_xs, out_ptr + slot * stride_os


@triton.jit
def _matvec_kernel(
    x_ptr,  # [M, K] f32/f16/bf16, row stride stride_xm, unit stride along K (EXPERTS: M = 1)
    w_ptr,  # float formats: typed [N, K]; block formats: uint8 [N, row_bytes] (EXPERTS: per expert)
    out_ptr,  # f32 [M, N], row stride stride_om
    M,
    N,
    K,
    stride_xm,
    stride_wn,  # in elements of w_ptr's type
    stride_om,
    ids_ptr,  # EXPERTS: int32/int64 [k] expert id of each slot; else unused (None)
    stride_we,  # EXPERTS: elements of w_ptr's type between experts
    stride_xs,  # EXPERTS: elements between the x rows of consecutive slots (0: x is shared)
    stride_os,  # EXPERTS: elements between output rows
    K_INTERP: tl.constexpr,  # K as a constexpr under TRITON_INTERPRET, else 0 (see below)
    EXPERTS: tl.constexpr,  # w_ptr is [n_expert, N, row]; grid axis 1 = slots (see top)
    FMT: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,
    L: tl.constexpr,
    TYPE_SIZE: tl.constexpr,  # bytes per block (block formats)
    BLOCK_VALUES: tl.constexpr,  # values per block: 1 (floats), 32 (legacy), 256 (K-quants)
):
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os
        )
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


# M = 1 kernels that read Q8_0, Q4_K, Q6_K (and Q4_0, Q4_1, Q5_0, Q5_1: _matvec_legacy_m1_kernel)
# through wider integer views of the same bytes (one load per 2, 4 or 8 bytes instead of one per
# value), extract each quant from a register once, and turn small integers into fp32 with the
# 2**23 trick (exact; avoids the quarter-rate I2F).
_MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # fp32 bits of 2**23


@triton.jit
def _small_int_f32(u, bias: tl.constexpr):
    """u: int32 in [0, 2**22) -> fp32 u - bias (exact for integers)."""
    return (u | _MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + bias)


@triton.jit
def _f16_lo(v):
    """The f16 in the low 16 bits of int32 v, as fp32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _matvec_q8_0_m1_kernel(
    x_ptr,  # [1, K] f32/f16/bf16 (EXPERTS: the slot's row)
    w_ptr,  # int16 view [N, row_bytes / 2]: block b of a row at halfword 17 * b
    out_ptr,  # f32 [1, N]
    N,
    K,
    stride_wn,  # in halfwords
    ids_ptr,  # EXPERTS only, like stride_we, stride_xs, stride_os: see _matvec_kernel
    stride_we,
    stride_xs,
    stride_os,
    K_INTERP: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,  # blocks per loop step
    JOIN: tl.constexpr,  # interleave the two bytes in registers so x loads are contiguous
):
    """Halfword p of a block's quants holds values 2p (low byte) and 2p + 1 (high byte)."""
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os
        )
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    row_base = w_ptr + rows_c[:, None, None] * stride_wn
    s3 = tl.arange(0, S)[None, :, None]
    p3 = tl.arange(0, 16)[None, None, :]
    acc_lo = tl.zeros([BLOCK_N, S, 16], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_N, S, 16], dtype=tl.float32)
    acc32 = tl.zeros([BLOCK_N, S, 32], dtype=tl.float32)
    j3 = tl.arange(0, 32)[None, None, :]
    nblk = K // 32
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, 32 * S):
        b = k0 // 32 + s3
        ok = b < nblk
        blk = row_base + tl.minimum(b, nblk - 1).to(tl.int64) * 17
        d = tl.load(blk).to(tl.float16, bitcast=True).to(tl.float32)  # [BLOCK_N, S, 1]
        h = tl.load(blk + 1 + p3).to(tl.int32)
        lo = _small_int_f32((h & 0xFF) ^ 0x80, 128.0)
        hi = _small_int_f32(((h >> 8) & 0xFF) ^ 0x80, 128.0)
        if JOIN:
            w = tl.reshape(tl.join(lo * d, hi * d), [BLOCK_N, S, 32])
            acc32 += w * tl.load(x_ptr + b * 32 + j3, mask=ok, other=0.0).to(tl.float32)
        else:
            xk = x_ptr + b * 32 + 2 * p3
            xe = tl.load(xk, mask=ok, other=0.0).to(tl.float32)
            xo = tl.load(xk + 1, mask=ok, other=0.0).to(tl.float32)
            acc_lo += (lo * d) * xe
            acc_hi += (hi * d) * xo
    if JOIN:
        acc = tl.sum(tl.sum(acc32, axis=2), axis=1)
    else:
        acc = tl.sum(tl.sum(acc_lo + acc_hi, axis=2), axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < N)


@triton.jit
def _matvec_q4_k_m1_kernel(
    x_ptr,  # [1, K] f32/f16/bf16 (EXPERTS: the slot's row)
    w_ptr,  # int32 view [N, row_bytes / 4]: super-block b of a row at word 36 * b
    out_ptr,  # f32 [1, N]
    N,
    K,
    stride_wn,  # in words
    ids_ptr,  # EXPERTS only, like stride_we, stride_xs, stride_os: see _matvec_kernel
    stride_we,
    stride_xs,
    stride_os,
    K_INTERP: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,  # super-blocks per loop step
    JOIN: tl.constexpr,  # interleave the four bytes in registers so x loads are contiguous
):
    """Word 0 = d | dmin << 16, words 1..3 = the 12 scale bytes, words 4..35 = qs. The tile is
    [BLOCK_N, 4 * NB, 8] words: (super-block, c, i) -> qs word 8c + i, whose byte b holds values
    64c + 4i + b (low nibble, sub-block 2c) and 64c + 32 + 4i + b (high nibble, sub-block
    2c + 1)."""
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os
        )
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    # A row is whole super-blocks of 36 words, so rows start 16-byte aligned (the launcher checks
    # the stride): the qs words load 128 bits at a time for any K, also when Triton cannot see
    # stride_wn % 16 == 0 (K = 768: 108 words, which it loaded one word at a time).
    row_base = w_ptr + tl.multiple_of(rows_c[:, None, None] * stride_wn, [4, 4, 4])
    t3 = tl.arange(0, 4 * NB)[None, :, None]
    i3 = tl.arange(0, 8)[None, None, :]
    c3 = t3 % 4
    upper = c3 >= 2  # sub-blocks 4..7
    acc = tl.zeros([BLOCK_N, 4 * NB, 8], dtype=tl.float32)
    acc32 = tl.zeros([BLOCK_N, 4 * NB, 32], dtype=tl.float32)
    l3 = tl.arange(0, 32)[None, None, :]
    nsb = K // 256
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, 256 * NB):
        sb = k0 // 256 + t3 // 4
        ok = sb < nsb
        blk = row_base + tl.minimum(sb, nsb - 1).to(tl.int64) * 36  # [BLOCK_N, 4 * NB, 1]
        w0 = tl.load(blk)
        w1 = tl.load(blk + 1)
        w2 = tl.load(blk + 2)
        w3 = tl.load(blk + 3)
        d = _f16_lo(w0)
        dmin = _f16_lo(w0 >> 16)
        qw = tl.load(blk + 4 + 8 * c3 + i3)  # [BLOCK_N, 4 * NB, 8]
        xb = x_ptr + sb * 256 + 64 * c3 + 4 * i3
        for h in tl.static_range(2):
            sh = 8 * (2 * (c3 % 2) + h)  # byte r = s % 4 of sub-block s = 2c + h
            a1 = (w1 >> sh) & 255  # scales[r]
            a2 = (w2 >> sh) & 255  # scales[r + 4]
            a3 = (w3 >> sh) & 255  # scales[r + 8]
            sc = tl.where(upper, (a3 & 15) | ((a1 >> 6) << 4), a1 & 63)
            mn = tl.where(upper, (a3 >> 4) | ((a2 >> 6) << 4), a2 & 63)
            dsc = d * sc.to(tl.float32)
            dmn = dmin * mn.to(tl.float32)
            if JOIN:
                v0 = dsc * _small_int_f32((qw >> (4 * h)) & 15, 0.0) - dmn
                v1 = dsc * _small_int_f32((qw >> (8 + 4 * h)) & 15, 0.0) - dmn
                v2 = dsc * _small_int_f32((qw >> (16 + 4 * h)) & 15, 0.0) - dmn
                v3 = dsc * _small_int_f32((qw >> (24 + 4 * h)) & 15, 0.0) - dmn
                w = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [BLOCK_N, 4 * NB, 32])
                xv = tl.load(x_ptr + sb * 256 + 64 * c3 + 32 * h + l3, mask=ok, other=0.0)
                acc32 += w * xv.to(tl.float32)
            else:
                for b in tl.static_range(4):
                    q = _small_int_f32((qw >> (8 * b + 4 * h)) & 15, 0.0)
                    xv = tl.load(xb + (32 * h + b), mask=ok, other=0.0).to(tl.float32)
                    acc += (dsc * q - dmn) * xv
    if JOIN:
        out = tl.sum(tl.sum(acc32, axis=2), axis=1)
    else:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + rows, out, mask=rows < N)


@triton.jit
def _matvec_q6_k_m1_kernel(
    x_ptr,  # [1, K] f32/f16/bf16 (EXPERTS: the slot's row)
    w_ptr,  # int16 view [N, row_bytes / 2]: super-block b of a row at halfword 105 * b
    out_ptr,  # f32 [1, N]
    N,
    K,
    stride_wn,  # in halfwords
    ids_ptr,  # EXPERTS only, like stride_we, stride_xs, stride_os: see _matvec_kernel
    stride_we,
    stride_xs,
    stride_os,
    K_INTERP: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NB: tl.constexpr,  # super-blocks per loop step
    JOIN: tl.constexpr,  # interleave the two bytes in registers so x loads are contiguous
):
    """Halfwords 0..63 = ql, 64..95 = qh, 96..103 = scales, 104 = d. The tile is
    [BLOCK_N, 4 * NB, 8]: (super-block, half hh, g, p') with p = 8g + p' covers the halfwords
    ql[32hh + p] (A), ql[32hh + 16 + p] (B), qh[16hh + p]; byte e of them holds l = 2p + e, i.e.
    values 128hh + 32k + l (k = 0..3) with the int8 scale 8hh + 2k + g."""
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os
        )
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    row_base = w_ptr + rows_c[:, None, None] * stride_wn
    t3 = tl.arange(0, 4 * NB)[None, :, None]
    p3 = tl.arange(0, 8)[None, None, :]
    hh = (t3 // 2) % 2
    g = t3 % 2
    acc = tl.zeros([BLOCK_N, 4 * NB, 8], dtype=tl.float32)
    acc16 = tl.zeros([BLOCK_N, 4 * NB, 16], dtype=tl.float32)
    l3 = tl.arange(0, 16)[None, None, :]
    nsb = K // 256
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, 256 * NB):
        sb = k0 // 256 + t3 // 4
        ok = sb < nsb
        blk = row_base + tl.minimum(sb, nsb - 1).to(tl.int64) * 105  # [BLOCK_N, 4 * NB, 1]
        d = tl.load(blk + 104).to(tl.float16, bitcast=True).to(tl.float32)
        p = 8 * g + p3
        qa = tl.load(blk + 32 * hh + p).to(tl.int32)
        qb = tl.load(blk + 32 * hh + 16 + p).to(tl.int32)
        qh = tl.load(blk + 64 + 16 * hh + p).to(tl.int32)
        xb = x_ptr + sb * 256 + 128 * hh + 2 * p
        for k in tl.static_range(4):
            scw = tl.load(blk + 96 + 4 * hh + k).to(tl.int32)
            sc = (scw << (24 - 8 * g)) >> 24  # signed byte g
            dsc = d * sc.to(tl.float32)
            if k % 2 == 0:
                ql = qa
            else:
                ql = qb
            if JOIN:
                sl = 4 * (k // 2)
                q0 = ((ql >> sl) & 15) | (((qh >> (2 * k)) & 3) << 4)
                q1 = ((ql >> (8 + sl)) & 15) | (((qh >> (8 + 2 * k)) & 3) << 4)
                w0 = dsc * _small_int_f32(q0, 32.0)
                w1 = dsc * _small_int_f32(q1, 32.0)
                w = tl.reshape(tl.join(w0, w1), [BLOCK_N, 4 * NB, 16])
                xv = tl.load(x_ptr + sb * 256 + 128 * hh + 32 * k + 16 * g + l3, mask=ok, other=0.0)
                acc16 += w * xv.to(tl.float32)
            else:
                for e in tl.static_range(2):
                    q6 = ((ql >> (8 * e + 4 * (k // 2))) & 15) | (
                        ((qh >> (8 * e + 2 * k)) & 3) << 4
                    )
                    xv = tl.load(xb + (32 * k + e), mask=ok, other=0.0).to(tl.float32)
                    acc += (dsc * _small_int_f32(q6, 32.0)) * xv
    if JOIN:
        out = tl.sum(tl.sum(acc16, axis=2), axis=1)
    else:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + rows, out, mask=rows < N)


# The legacy 4/5-bit formats at M = 1. Counted in the sm_90 SASS of the K loop (not timed: no GPU
# at hand), instructions per weight value at 8 rows / 2048 values / 4 warps, x f16: Q4_0 4.6 (1
# LOP3, 1 FADD, 1.1 FFMA, 0.5 LDG, ...), Q4_1 5.3, Q5_0 8.2, Q5_1 7.8. The byte kernel takes
# 16-29 (Q4_0 21, an 8-bit load per value), a first version in the style of the Q8_0 kernel
# (join/reshape, shared-memory layout conversions in the loop) 8.7-12.


@triton.jit
def _masked_load(ptr, ok, EVEN: tl.constexpr):
    """tl.load(ptr), masked by ok (other 0) unless EVEN says no step overruns K."""
    if EVEN:
        v = tl.load(ptr)
    else:
        v = tl.load(ptr, mask=ok, other=0)
    return v


@triton.jit
def _legacy_nibble(part, qhs, magic, xb, ok, p, sx, E0: tl.constexpr, NIB: tl.constexpr, EVEN, FMT):
    """(p + (q - bias) * x, sx + x) for nibble NIB of part, an int32 holding bytes E0, E0 + 1,
    ... of the lane's qs bytes (NIB // 2 is the byte, NIB % 2 the high nibble); xb points at
    the x of the lane's byte 0, low nibble; qhs holds the fifth bit of byte e's nibble h at bit
    e + 16 h (Q5_0, Q5_1).

    Nibble NIB sits at bit 4 NIB and is used in place: (part & 15 << 4 NIB) | 2**23 as fp32 is
    2**23 + q * 16**NIB exactly, so one LOP3 and one FADD give (q - bias) * 16**NIB, and x
    scaled by 16**-NIB (exact, shared by the thread's rows) makes the product (q - bias) * x
    exactly. The nibble, and Q5's fifth bit above it, must stay in the mantissa (below bit 23),
    so nibbles 5..7 are read from part >> 12, at bit 4 NIB - 12."""
    NN: tl.constexpr = NIB if NIB < 5 else NIB - 3  # the nibble's place in src
    E: tl.constexpr = E0 + NIB // 2  # byte of the lane
    HI: tl.constexpr = NIB % 2
    BIAS: tl.constexpr = 8.0 if FMT == Q4_0 else (16.0 if FMT == Q5_0 else 0.0)  # q - BIAS
    if NIB < 5:
        src = part
    else:
        src = part >> 12
    t = (src & (15 << (4 * NN))) | magic
    if FMT == Q5_0 or FMT == Q5_1:  # bit E + 16 HI of qhs to bit 4 NN + 4, above the nibble
        UP: tl.constexpr = 4 * NN + 4 - E - 16 * HI
        if UP >= 0:
            t = t | ((qhs << UP) & (16 << (4 * NN)))
        else:
            t = t | ((qhs >> -UP) & (16 << (4 * NN)))
    q = t.to(tl.float32, bitcast=True) - (8388608.0 + BIAS * 16**NN)  # (q - BIAS) * 16**NN
    xv = _masked_load(xb + (E + 16 * HI), ok, EVEN).to(tl.float32)
    p += q * (xv * (1.0 / 16**NN))
    if FMT == Q4_1 or FMT == Q5_1:
        sx += xv
    return p, sx


@triton.jit
def _matvec_legacy_m1_kernel(
    x_ptr,  # [1, K] f32/f16/bf16 (EXPERTS: the slot's row)
    w_ptr,  # Q4_0, Q5_0: int16; Q4_1: int32; Q5_1: int64 view [N, row_bytes / word]
    out_ptr,  # f32 [1, N]
    N,
    K,
    stride_wn,  # in words of w_ptr's type
    ids_ptr,  # EXPERTS only, like stride_we, stride_xs, stride_os: see _matvec_kernel
    stride_we,
    stride_xs,
    stride_os,
    magic,  # _MAGIC, as a runtime value (see below)
    K_INTERP: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,  # blocks per tile: S * QW lanes, one per thread where K allows
    R: tl.constexpr,  # tiles per loop step
    EVEN: tl.constexpr,  # K // 32 is a multiple of S * R: no step overruns K, no load masks
    FMT: tl.constexpr,  # Q4_0, Q4_1, Q5_0 or Q5_1
):
    """Q4_0, Q4_1, Q5_0, Q5_1 at M = 1. A block is WPB words of BW bytes (the view's item): a
    header (Q4_0: d; Q5_0: d, qh lo, qh hi; Q4_1: d | m << 16; Q5_1: d | m << 16 | qh << 32),
    then 16 bytes of qs, whose byte i holds values i (low nibble) and 16 + i (high nibble); bit v
    of qh is the fifth bit of value v.

    A lane reads LB bytes of qs (Q4_0, Q5_0: two halfwords, 2-byte aligned only; Q4_1: one
    word; Q5_1: one 8-byte word) and its block's header (the lanes of a block read the same
    address: one transaction). A tile is [S * QW, BLOCK_N]: lane j % QW of block j // QW, for
    each row. Lanes run along the blocks of a row (a warp's loads are contiguous) and each
    thread holds all BLOCK_N rows of its lane, so its x values (a [S * QW, 1] tile) are loaded
    and converted once for BLOCK_N rows, and no value changes threads in the loop (no layout
    conversion). The R tiles of a step are constant offsets from pointers carried through the
    loop: immediates of one address per row.

    The values are used in place (_legacy_nibble): per value one LOP3, one FADD and one FFMA;
    the lane's sum is multiplied by d once (and m by the lane's sum of x: Q4_1, Q5_1). ptxas
    gives LOP3 one immediate operand, so `& mask | 2**23` with both immediates takes two
    instructions; `magic` puts 2**23 in a register."""
    BW: tl.constexpr = 2 if (FMT == Q4_0 or FMT == Q5_0) else (4 if FMT == Q4_1 else 8)
    LB: tl.constexpr = 8 if BW == 8 else 4  # qs bytes per lane
    QW: tl.constexpr = 16 // LB  # lanes per block
    WPB: tl.constexpr = 9 if FMT == Q4_0 else (11 if FMT == Q5_0 else (5 if FMT == Q4_1 else 3))
    QOFF: tl.constexpr = 3 if FMT == Q5_0 else 1  # first qs word
    FIVE: tl.constexpr = FMT == Q5_0 or FMT == Q5_1
    AFFINE: tl.constexpr = FMT == Q4_1 or FMT == Q5_1  # d * q + m
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os
        )
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    row_base = w_ptr + rows_c[None, :] * stride_wn  # [1, BLOCK_N]
    j = tl.arange(0, S * QW)[:, None]  # [S * QW, 1]
    sb = j // QW  # block of the tile
    li = j % QW  # lane of the block
    # Carried through the loop; the R tiles of a step are constant offsets of them.
    hdr_p = row_base + sb * WPB  # [S * QW, BLOCK_N]
    qs_p = hdr_p + QOFF + li * (LB // BW)
    x_p = x_ptr + sb * 32 + LB * li  # [S * QW, 1]: the value of the lane's byte 0, low nibble
    acc = tl.zeros([S * QW, BLOCK_N], dtype=tl.float32)
    nblk = K // 32
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, 32 * S * R):
        for r in tl.static_range(R):
            hp = hdr_p + r * S * WPB
            qp = qs_p + r * S * WPB
            xb = x_p + r * S * 32
            ok = k0 // 32 + r * S + sb < nblk  # [S * QW, 1]; unused when EVEN
            hdr = _masked_load(hp, ok, EVEN)  # [S * QW, BLOCK_N]
            qhs = 0
            m = 0.0
            if BW == 2:
                d = hdr.to(tl.float16, bitcast=True).to(tl.float32)
                if FIVE:
                    qh_lo = _masked_load(hp + 1, ok, EVEN).to(tl.int32) & 0xFFFF
                    qh_hi = _masked_load(hp + 2, ok, EVEN).to(tl.int32)
                    qhs = (qh_lo | (qh_hi << 16)) >> (LB * li)
            else:
                h32 = hdr.to(tl.int32)  # low word (Q5_1: d | m << 16)
                d = _f16_lo(h32)
                m = _f16_lo(h32 >> 16)
                if FIVE:
                    qhs = (hdr >> 32).to(tl.int32) >> (LB * li)
            p = tl.zeros([S * QW, BLOCK_N], dtype=tl.float32)
            sx = tl.zeros([S * QW, 1], dtype=tl.float32)
            if BW == 2:  # two halfwords: bytes 0, 1 and 2, 3 of the lane
                for h in tl.static_range(2):
                    part = _masked_load(qp + h, ok, EVEN).to(tl.int32)  # sign-extended
                    for n in tl.static_range(4):
                        p, sx = _legacy_nibble(part, qhs, magic, xb, ok, p, sx, 2 * h, n, EVEN, FMT)
            else:
                qs = _masked_load(qp, ok, EVEN)
                for h in tl.static_range(LB // 4):  # 32-bit parts: bytes 4h .. 4h + 3
                    if BW == 8:
                        part = (qs >> (32 * h)).to(tl.int32)
                    else:
                        part = qs
                    for n in tl.static_range(8):
                        p, sx = _legacy_nibble(part, qhs, magic, xb, ok, p, sx, 4 * h, n, EVEN, FMT)
            if AFFINE:
                acc += d * p + m * sx
            else:
                acc += d * p
        hdr_p += S * R * WPB
        qs_p += S * R * WPB
        x_p += S * R * 32
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + rows, out, mask=rows < N)

"""Decode mat-vec straight from GGUF blocks: out[m, n] = sum_k x[m, k] * W[n, k], fp32 accumulation.

The weight is read in its stored format and dequantized in registers; the byte layouts are the ones
documented at the top of kiln/quant/legacy.py, k_quants.py and floats.py. Each program owns
BLOCK_N output rows and walks K one tile of [S, L] values at a time:
- float formats: S = 1, L = BLOCK_K values; w_ptr is typed (f32/f16/bf16), K is masked.
- legacy formats (32-value blocks): S = blocks per tile, L = 32; K is a whole number of blocks.
- K-quants (256-value super-blocks): one super-block per tile as [8, 32] (8 sub-blocks of 32).
Rows past N are clamped to N - 1 so weight loads need no mask; only the store is masked.

Every kernel also serves the MoE decode mat-vec (EXPERTS=True): w_ptr is then a stack of
[n_expert, N, row] weights and grid axis 1 runs over the T * k selected slots (slot s = t * k + j:
token t's j-th expert); the program of slot s reads its expert id from ids_ptr[s] on the device
(no host sync) and moves w_ptr, x_ptr and out_ptr to that expert, x row s // SLOTS_PER_X
(SLOTS_PER_X = k: a token's k slots share its row; 1: each slot has its own row, or every slot
reads row 0 when stride_xs = 0) and output row s before the K loop, which is the same code in
both modes.

The dequantization helpers and format ids are kernels/triton/dequant.py's. Only @triton.jit
functions live here; kiln/kernels/matvec.py launches them.
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
    Q6_K,
    Q8_0,
    _dequant_k,
    _dequant_legacy,
)
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _slot_pointers(
    w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os, SLOTS_PER_X: tl.constexpr
):
    """The pointers of grid column s = program_id(1) of an expert launch: expert ids_ptr[s]'s
    weights (64-bit offset: a stack of expert weights can exceed 2**31 elements), x row
    s // SLOTS_PER_X (row 0 for every slot when stride_xs = 0) and output row s."""
    slot = tl.program_id(1)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    if SLOTS_PER_X == 1:  # one row per slot, or x shared (stride 0): the T = 1 launches' code
        x_row = slot
    else:  # a token's SLOTS_PER_X slots read its row
        x_row = slot // SLOTS_PER_X
    return w_ptr + expert * stride_we, x_ptr + x_row * stride_xs, out_ptr + slot * stride_os


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
    ids_ptr,  # EXPERTS: int32/int64 [T * k] expert id of each slot; else unused (None)
    stride_we,  # EXPERTS: elements of w_ptr's type between experts
    stride_xs,  # EXPERTS: elements between consecutive x rows (0: one row shared by every slot)
    stride_os,  # EXPERTS: elements between output rows
    K_INTERP: tl.constexpr,  # K as a constexpr under TRITON_INTERPRET, else 0 (see below)
    EXPERTS: tl.constexpr,  # w_ptr is [n_expert, N, row]; grid axis 1 = slots (see top)
    SLOTS_PER_X: tl.constexpr,  # EXPERTS: consecutive slots that read one x row (k or 1)
    FMT: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,
    L: tl.constexpr,
    TYPE_SIZE: tl.constexpr,  # bytes per block (block formats)
    BLOCK_VALUES: tl.constexpr,  # values per block: 1 (floats), 32 (legacy), 256 (K-quants)
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os, SLOTS_PER_X
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
    m4 = m_idx[:, None, None, None]  # [M_PAD, 1, 1, 1]

    # Each row's products are summed in the same order at every M: per (row, s, l) lane over
    # the tiles, then across the tile once at the end (no cross-thread reduction in the loop;
    # M > 1 keeps one such accumulator per x row, the weight tile read once for all of them).
    acc4 = tl.zeros([M_PAD, BLOCK_N, S, L], dtype=tl.float32)
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
        xv = tl.load(x_ptr + m4 * stride_xm + k[None], mask=k_ok[None] & (m4 < M), other=0.0)
        acc4 += w[None] * xv.to(tl.float32)  # [M_PAD, BLOCK_N, S, L]
    acc = tl.sum(tl.sum(acc4, axis=3), axis=2)  # [M_PAD, BLOCK_N]
    out = out_ptr + m_idx[:, None] * stride_om + rows[None, :]
    tl.store(out, acc, mask=(m_idx[:, None] < M) & row_ok[None, :])


# The M = 1 kernel of the block formats, _matvec_lanes_m1_kernel, reads the blocks through wider
# integer views of the same bytes (one load per 2, 4 or 8 bytes instead of one per value),
# extracts each quant from a register once, and turns small integers into fp32 with the 2**23
# trick (exact; avoids the quarter-rate I2F).
_MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # fp32 bits of 2**23


@triton.jit
def _f16_lo(v):
    """The f16 in the low 16 bits of int32 v, as fp32."""
    return (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


# The block formats at M = 1 on lanes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-value blocks), Q4_K and
# Q6_K (256-value super-blocks). Counted in the sm_90 SASS of the K loop of the legacy formats (not
# timed), instructions per weight value at 8 rows / 2048 values / 4 warps, x f16: Q4_0 4.6 (1
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
def _nibble_dot(
    part, qhs, magic, xb, ok, p, sx, E0: tl.constexpr, NIB: tl.constexpr, HI_X: tl.constexpr,
    EVEN, FMT,
):  # fmt: skip
    """(p + (q - bias) * x, sx + x) for nibble NIB of part, an int32 holding bytes E0, E0 + 1,
    ... of the lane's qs bytes (NIB // 2 is the byte, NIB % 2 the high nibble); xb points at
    the x of the lane's byte 0, low nibble, and a high nibble's x is HI_X values further (16 in
    a legacy block, 32 in a Q4_K one); qhs holds the fifth bit of byte e's nibble h at bit
    e + 16 h (Q5_0, Q5_1). sx sums x for the formats with an offset (Q4_1, Q5_1, Q4_K).

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
    xv = _masked_load(xb + (E + HI_X * HI), ok, EVEN).to(tl.float32)
    p += q * (xv * (1.0 / 16**NN))
    if FMT == Q4_1 or FMT == Q5_1 or FMT == Q4_K:
        sx += xv
    return p, sx


@triton.jit
def _byte_dot(part, magic, xb, ok, p, E0: tl.constexpr, B: tl.constexpr, BIAS: tl.constexpr, EVEN):
    """p + (u - BIAS) * x for byte B (0 or 1) of part, an int32 whose byte holds u in 0..255 (a
    Q8_0 quant with its sign bit flipped, BIAS 128; a Q6_K quant, BIAS 32), x at xb + E0 + B:
    used in place like _nibble_dot's nibbles, (part & 255 << 8 B) | 2**23 as fp32 is
    2**23 + u * 256**B exactly."""
    t = (part & (255 << (8 * B))) | magic
    q = t.to(tl.float32, bitcast=True) - (8388608.0 + BIAS * 256**B)  # (u - BIAS) * 256**B
    xv = _masked_load(xb + (E0 + B), ok, EVEN).to(tl.float32)
    return p + q * (xv * (1.0 / 256**B))


@triton.jit
def _q6_k_lane(hp, q_off, h_off, s_off, g, xb, ok, magic, EVEN):
    """One Q6_K lane's share of d * sum_v scale * (q - 32) * x for each row: hp points at the
    super-blocks (halfwords: ql 0..63, qh 64..95, scales 96..103, d 104). The lane is half hh
    and l = l0 .. l0 + 7 of it (kiln/quant/k_quants.py): value 128 hh + 32 k + l (k = 0..3) has
    the low (k < 2) or high nibble of ql[64 hh + 32 (k % 2) + l] and bits 2k, 2k + 1 of
    qh[32 hh + l], and the int8 scale 8 hh + 2k + g (g = l0 // 16). q_off, h_off, s_off: the
    halfwords of ql[64 hh + l0], qh[32 hh + l0] and scales[8 hh]; xb: the x of value
    128 hh + l0. For each halfword i of the lane and each k, one LOP3 pair puts the two bytes'
    6-bit quants side by side (c_k), used in place by _byte_dot."""
    p0 = tl.zeros(hp.shape, dtype=tl.float32)
    p1 = tl.zeros(hp.shape, dtype=tl.float32)
    p2 = tl.zeros(hp.shape, dtype=tl.float32)
    p3 = tl.zeros(hp.shape, dtype=tl.float32)
    for i in tl.static_range(4):  # halfword i: l = l0 + 2i + e, e = 0, 1
        a = _masked_load(hp + q_off + i, ok, EVEN).to(tl.int32)
        b = _masked_load(hp + q_off + 16 + i, ok, EVEN).to(tl.int32)
        h = _masked_load(hp + h_off + i, ok, EVEN).to(tl.int32)
        c0 = (a & 0x0F0F) | ((h << 4) & 0x3030)
        c1 = (b & 0x0F0F) | ((h << 2) & 0x3030)
        c2 = ((a >> 4) & 0x0F0F) | (h & 0x3030)
        c3 = ((b >> 4) & 0x0F0F) | ((h >> 2) & 0x3030)
        for e in tl.static_range(2):
            p0 = _byte_dot(c0, magic, xb, ok, p0, 2 * i, e, 32.0, EVEN)
            p1 = _byte_dot(c1, magic, xb, ok, p1, 32 + 2 * i, e, 32.0, EVEN)
            p2 = _byte_dot(c2, magic, xb, ok, p2, 64 + 2 * i, e, 32.0, EVEN)
            p3 = _byte_dot(c3, magic, xb, ok, p3, 96 + 2 * i, e, 32.0, EVEN)
    d = _masked_load(hp + 104, ok, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
    up = 24 - 8 * g  # scale byte g of the halfword to the top, then back down signed
    s0 = ((_masked_load(hp + s_off, ok, EVEN).to(tl.int32) << up) >> 24).to(tl.float32)
    s1 = ((_masked_load(hp + s_off + 1, ok, EVEN).to(tl.int32) << up) >> 24).to(tl.float32)
    s2 = ((_masked_load(hp + s_off + 2, ok, EVEN).to(tl.int32) << up) >> 24).to(tl.float32)
    s3 = ((_masked_load(hp + s_off + 3, ok, EVEN).to(tl.int32) << up) >> 24).to(tl.float32)
    return d * (s0 * p0 + s1 * p1 + s2 * p2 + s3 * p3)


@triton.jit
def _q4_k_scale_min(wa, wb, wc, sh, upper):
    """The 6-bit (scale, min) of sub-block s of a Q4_K super-block as fp32, from its 12 scale
    bytes as three int32 words wa (bytes 0..3), wb (4..7), wc (8..11); sh = 8 (s % 4), upper =
    s >= 4 (kiln/quant/k_quants.py documents the packing)."""
    a = (wa >> sh) & 255  # scales[s % 4]
    b = (wb >> sh) & 255  # scales[s % 4 + 4]
    c = (wc >> sh) & 255  # scales[s % 4 + 8]
    sc = tl.where(upper, (c & 15) | ((a >> 6) << 4), a & 63)
    mn = tl.where(upper, (c >> 4) | ((b >> 6) << 4), b & 63)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _matvec_lanes_m1_kernel(
    x_ptr,  # [1, K] f32/f16/bf16 (EXPERTS: the slot's row)
    w_ptr,  # Q4_0, Q5_0: int16; Q4_1: int32; Q5_1, Q4_K: int64 view [N, row_bytes / word]
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
    SLOTS_PER_X: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,  # blocks per tile: S * QW lanes, one per thread where K allows
    R: tl.constexpr,  # tiles per loop step
    EVEN: tl.constexpr,  # the blocks of a row are a multiple of S * R: no step overruns K
    FMT: tl.constexpr,  # Q4_0, Q4_1, Q5_0, Q5_1 or Q4_K
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K at M = 1. A block is WPB words of BW bytes (the
    view's item): a header, then the qs bytes (Q6_K: see _q6_k_lane; its d comes last).
    - Q8_0 (32 values, 17 halfwords): d, then 32 int8 quants (_byte_dot uses them in place).
    - Legacy (32 values): header Q4_0: d; Q5_0: d, qh lo, qh hi; Q4_1: d | m << 16; Q5_1:
      d | m << 16 | qh << 32; then 16 bytes of qs, whose byte i holds values i (low nibble) and
      16 + i (high nibble); bit v of qh is the fifth bit of value v.
    - Q4_K (256 values, 18 words of 8 bytes): word 0 = d | dmin << 16 | scales[0..3] << 32,
      word 1 = scales[4..11], words 2..17 = qs, whose byte 32c + i holds values 64c + i (low
      nibble, sub-block 2c) and 64c + 32 + i (high nibble, sub-block 2c + 1).

    A lane reads LB bytes of qs (Q8_0, Q4_0, Q5_0: two halfwords, 2-byte aligned only; Q4_1: one
    word; Q5_1, Q4_K: one 8-byte word) and its block's header (the lanes of a block read the
    same address: one transaction). A Q4_K lane's 8 bytes lie in one 32-byte run, so its low
    nibbles belong to one sub-block and its high nibbles to the next. A tile is [S * QW,
    BLOCK_N]: lane j % QW of block j // QW, for each row. Lanes run along the blocks of a row
    (a warp's loads are contiguous) and each thread holds all BLOCK_N rows of its lane, so its
    x values (a [S * QW, 1] tile) are loaded and converted once for BLOCK_N rows, and no value
    changes threads in the loop (no layout conversion). The R tiles of a step are constant
    offsets from pointers carried through the loop: immediates of one address per row.

    The values are used in place (_nibble_dot): per value one LOP3, one FADD and one FFMA; the
    lane's sums are scaled once: by d (and m by the lane's sum of x: Q4_1, Q5_1), for Q4_K by
    d * scale and dmin * min of each of its two sub-blocks. ptxas gives LOP3 one immediate
    operand, so `& mask | 2**23` with both immediates takes two instructions; `magic` puts
    2**23 in a register."""
    KQ: tl.constexpr = FMT == Q4_K
    Q8: tl.constexpr = FMT == Q8_0
    Q6: tl.constexpr = FMT == Q6_K
    BV: tl.constexpr = 256 if (KQ or Q6) else 32  # values per block
    BW: tl.constexpr = 2 if (FMT == Q4_0 or FMT == Q5_0 or Q8 or Q6) else (4 if FMT == Q4_1 else 8)
    LB: tl.constexpr = 8 if BW == 8 else 4  # qs bytes per lane
    QW: tl.constexpr = 8 if Q6 else (128 if KQ else (32 if Q8 else 16)) // LB  # lanes per block
    WPB: tl.constexpr = (
        105 if Q6 else (18 if KQ else (17 if Q8 else (9 if FMT == Q4_0 else (
            11 if FMT == Q5_0 else (5 if FMT == Q4_1 else 3)))))
    )  # fmt: skip
    QOFF: tl.constexpr = 2 if KQ else (3 if FMT == Q5_0 else 1)  # first qs word
    HI_X: tl.constexpr = 32 if KQ else 16  # x of a high nibble, from its low nibble's
    FIVE: tl.constexpr = FMT == Q5_0 or FMT == Q5_1
    AFFINE: tl.constexpr = FMT == Q4_1 or FMT == Q5_1  # d * q + m
    if PDL:
        wait_for_inputs()
    if EXPERTS:
        w_ptr, x_ptr, out_ptr = _slot_pointers(
            w_ptr, x_ptr, out_ptr, ids_ptr, stride_we, stride_xs, stride_os, SLOTS_PER_X
        )
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    row_base = w_ptr + rows_c[None, :] * stride_wn  # [1, BLOCK_N]
    j = tl.arange(0, S * QW)[:, None]  # [S * QW, 1]
    sb = j // QW  # block of the tile
    if KQ:
        # Lane order scrambled (9 is odd: a permutation of 0..15): a warp still reads whole
        # 128-byte runs of qs, but Triton cannot prove two neighbours' words contiguous, so it
        # keeps one lane per thread instead of vectorizing the qs load to 16 bytes in another
        # layout than the header's (a shared-memory conversion of every tile: LDS/STS/BAR in the
        # loop's sm_90 SASS, and 57 us for a 4096 x 4096 weight at 8/2048/4).
        li = (9 * (j % QW)) % QW
    else:
        li = j % QW  # lane of the block
    # Carried through the loop; the R tiles of a step are constant offsets of them.
    hdr_p = row_base + sb * WPB  # [S * QW, BLOCK_N]
    qs_p = hdr_p + QOFF + li * (LB // BW)
    if Q6:  # the lane (_q6_k_lane) is half li // 4, l0 = 8 (li % 4)
        q6_q = 32 * (li // 4) + 4 * (li % 4)
        q6_h = 64 + 16 * (li // 4) + 4 * (li % 4)
        q6_s = 96 + 4 * (li // 4)
        q6_g = (li % 4) // 2
        x_p = x_ptr + sb * 256 + 128 * (li // 4) + 8 * (li % 4)
        sh = 0
        upper = False
    elif KQ:  # the value of the lane's byte 0, low nibble: [S * QW, 1]
        x_p = x_ptr + sb * 256 + 64 * (li // 4) + LB * (li % 4)
        sh = 16 * ((li // 4) % 2)  # byte 2c % 4 of the scale words (sub-block 2c; 2c + 1: +8)
        upper = li >= 8  # sub-blocks 4..7
    else:
        x_p = x_ptr + sb * 32 + LB * li
        sh = 0
        upper = False
    acc = tl.zeros([S * QW, BLOCK_N], dtype=tl.float32)
    nblk = K // BV
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, BV * S * R):
        for r in tl.static_range(R):
            hp = hdr_p + r * S * WPB
            qp = qs_p + r * S * WPB
            xb = x_p + r * S * BV
            ok = k0 // BV + r * S + sb < nblk  # [S * QW, 1]; unused when EVEN
            if Q6:
                acc += _q6_k_lane(hp, q6_q, q6_h, q6_s, q6_g, xb, ok, magic, EVEN)
            else:
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
                    h32 = hdr.to(tl.int32)  # low word (Q5_1, Q4_K: d | m << 16, d | dmin << 16)
                    d = _f16_lo(h32)
                    m = _f16_lo(h32 >> 16)
                    if FIVE:
                        qhs = (hdr >> 32).to(tl.int32) >> (LB * li)
                p = tl.zeros([S * QW, BLOCK_N], dtype=tl.float32)
                sx = tl.zeros([S * QW, 1], dtype=tl.float32)
                p_hi = tl.zeros([S * QW, BLOCK_N], dtype=tl.float32)  # Q4_K: the high nibbles
                sx_hi = tl.zeros([S * QW, 1], dtype=tl.float32)
                if Q8:  # two halfwords: bytes 0, 1 and 2, 3 of the lane, sign bits flipped
                    for h in tl.static_range(2):
                        part = _masked_load(qp + h, ok, EVEN).to(tl.int32) ^ 0x8080
                        for b in tl.static_range(2):
                            p = _byte_dot(part, magic, xb, ok, p, 2 * h, b, 128.0, EVEN)
                elif BW == 2:  # two halfwords: bytes 0, 1 and 2, 3 of the lane
                    for h in tl.static_range(2):
                        part = _masked_load(qp + h, ok, EVEN).to(tl.int32)  # sign-extended
                        for n in tl.static_range(4):
                            p, sx = _nibble_dot(
                                part, qhs, magic, xb, ok, p, sx, 2 * h, n, HI_X, EVEN, FMT
                            )
                else:
                    qs = _masked_load(qp, ok, EVEN)
                    for h in tl.static_range(LB // 4):  # 32-bit parts: bytes 4h .. 4h + 3
                        if BW == 8:
                            part = (qs >> (32 * h)).to(tl.int32)
                        else:
                            part = qs
                        for n in tl.static_range(8):
                            if KQ and n % 2 == 1:  # Q4_K: high nibbles are the next sub-block
                                p_hi, sx_hi = _nibble_dot(
                                    part, qhs, magic, xb, ok, p_hi, sx_hi, 4 * h, n, HI_X, EVEN, FMT
                                )
                            else:
                                p, sx = _nibble_dot(
                                    part, qhs, magic, xb, ok, p, sx, 4 * h, n, HI_X, EVEN, FMT
                                )
                if KQ:
                    wa = (hdr >> 32).to(tl.int32)
                    w1 = _masked_load(hp + 1, ok, EVEN)
                    wb = w1.to(tl.int32)
                    wc = (w1 >> 32).to(tl.int32)
                    sc, mn = _q4_k_scale_min(wa, wb, wc, sh, upper)
                    sc_hi, mn_hi = _q4_k_scale_min(wa, wb, wc, sh + 8, upper)
                    acc += d * (sc * p + sc_hi * p_hi) - m * (mn * sx + mn_hi * sx_hi)
                elif AFFINE:
                    acc += d * p + m * sx
                else:
                    acc += d * p
        hdr_p += S * R * WPB
        qs_p += S * R * WPB
        x_p += S * R * BV
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + rows, out, mask=rows < N)

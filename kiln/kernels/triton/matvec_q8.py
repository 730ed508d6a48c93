"""The int8-activation mat-vec: out[m, n] = sum_k x[m, k] * W[n, k] with x in q8_1
(kiln/quant/q8_1.py: int8 quants, a float32 d and s = d * sum(q) per 32 values) and W in its
GGUF blocks, for M = 1..8 rows of x read against one pass over the weight.

Why: the bf16-activation mat-vec spends about 7 sm_90 instructions per weight value on Q4_K (a
LOP3, an FADD and an FFMA per value, plus the scales), which makes it instruction-bound at about
half of the copy bandwidth. Here four weight quants and four x quants meet in one `dp4a` (a
4-way int8 dot product with int32 accumulation): 8 Q4_K nibbles cost two LOP3 and two dp4a per
x row, and the float work (the block scales) is paid once per lane and x block (8 or 16 values).

Lanes, as in the bf16 lanes kernel (kernels/triton/matvec.py): a tile is [S * QW, BLOCK_N], lane
j % QW of block j // QW of each of BLOCK_N weight rows, lanes along K so a warp's loads are
contiguous; x is [M_PAD, S * QW, 1] (loaded once for the BLOCK_N rows) and the accumulator
[M_PAD, S * QW, BLOCK_N] fp32, summed over the lanes at the end. x's quants are read as int32
words (4 quants), its d as float32 (s is not read: the offsets use the lane's own sums of x
quants, which the BLOCK_N rows share). A lane's part of one x block is one int32 dot product,
scaled once: acc += (d_w * scale) * (d_x * dot).

Per format, a lane (values of one 32-value x block are always in one lane's word pair):
- Q8_0 (int16 view, 17 halfwords): 8 bytes = 8 signed quants; 4 lanes a block.
- Q4_0 (int16 view, 9 halfwords): 4 bytes of qs = values 4i..4i+3 (low nibbles) and 16 + 4i..
  (high); 4 lanes a block; q - 8 as dp4a(q, x) starting from -8 * sum(x quants of the word).
- Q4_1 (int32 view, 5 words: d | m << 16, then qs): the lanes of Q4_0; + m * d_x * sum(x quants).
- Q5_0 (int16 view, 11 halfwords: d, qh, qs), Q5_1 (int32 view, 6 words: d | m << 16, qh, qs):
  the lanes of Q4_0, each nibble's fifth bit (bit v of qh for value v) put above it in its byte.
- Q4_K (int64 view, 18 words): 16 bytes of qs (two words) = 16 low nibbles of sub-block 2c and
  16 high nibbles of sub-block 2c + 1; 8 lanes a block, so the scale decoding is paid once per
  32 values (16 bytes a lane: sm_90 K loop 2.6 instructions a weight value at M = 1 against 4.1
  with 8 bytes); the mins: - dmin * min * d_x * sum(x quants).
- Q5_K (int64 view, 22 words: Q4_K's header, 4 words of qh, then qs): the lanes of Q4_K; value
  i of a 32-byte run c of qs has its fifth bit at bit 2c (low nibble) or 2c + 1 (high) of qh[i].
- Q6_K (int16 view, 105 halfwords): half hh, l = l0..l0 + 7 of it for each k = 0..3 (values
  128 hh + 32 k + l); 8 lanes a block; q - 32 as dp4a from -32 * sum(x quants).

With EXPERTS on, the kernel is the MoE decode mat-vec (as kernels/triton/matvec.py's): w_ptr is a
stack [n_expert, N, words], grid axis 1 runs over the T * k slots (s = t * k + j), and the
program of slot s reads its expert id on the device and moves w_ptr, the x row (s // SLOTS_PER_X:
a token's k slots share its q8_1 row, or each slot has its own) and the output row s before
the K loop, at M = 1.

DP4A off (the interpreter cannot run inline PTX) computes the same int32 dot product with shifts
and multiplies: integer sums are exact in any order, so both give the same bits.

Only @triton.jit functions live here; kiln/kernels/matvec_q8.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.dequant import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from kiln.kernels.triton.matvec import _f16_lo, _masked_load, _q4_k_scale_min
from kiln.kernels.triton.pdl import wait_for_inputs

_NIB: tl.constexpr = tl.constexpr(0x0F0F0F0F)
_ONES: tl.constexpr = tl.constexpr(0x01010101)


@triton.jit
def _dp4a(a, b, c, DP4A: tl.constexpr):
    """c + sum over the 4 bytes of a and b of a_i * b_i (signed bytes; int32 in and out)."""
    if DP4A:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, c],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        a = a + 0 * b  # an int32 tensor also where a is a constant (_ONES)
        for i in tl.static_range(4):
            c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _fifth_bits(bits):
    """Bits 0..3 of int32 `bits` moved to bit 4 of bytes 0..3 (Q5's fifth bit of 4 values): one
    multiply by 1 + 2^7 + 2^14 + 2^21 puts bit i at bits i, i + 7, i + 14, i + 21 (16 distinct
    places: no carries), of which 8 i is the one kept."""
    return (((bits & 15) * 0x00204081) & 0x01010101) << 4


@triton.jit
def _word(hp, off, ok, EVEN: tl.constexpr):
    """The int32 of halfwords off, off + 1 at hp (2-byte aligned blocks)."""
    lo = _masked_load(hp + off, ok, EVEN).to(tl.int32) & 0xFFFF
    hi = _masked_load(hp + off + 1, ok, EVEN).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _x_block(xq_p, xd_p, w0, blk, xok, DP4A: tl.constexpr):
    """x words w0, w0 + 1 (8 quants) of every row, the d and s of their block blk, and the sum of
    the 8 quants (for the formats with an offset): [M_PAD, lanes, 1] each."""
    a = tl.load(xq_p + w0, mask=xok, other=0)
    b = tl.load(xq_p + w0 + 1, mask=xok, other=0)
    d = tl.load(xd_p + 2 * blk, mask=xok, other=0.0)
    sq = _dp4a(_ONES, b, _dp4a(_ONES, a, tl.zeros_like(a), DP4A), DP4A)
    return a, b, d, sq


@triton.jit
def _matvec_q8_kernel(
    xq_ptr,  # int32 [M, K / 4]: the q8_1 quants, 4 a word
    xd_ptr,  # float32 [M, K / 32, 2]: d, s of each x block
    w_ptr,  # Q8_0, Q4_0, Q5_0, Q6_K: int16; Q4_1, Q5_1: int32; Q4_K, Q5_K: int64 [N, words]
    out_ptr,  # f32 [M, N], row stride stride_om
    M,
    N,
    K,
    stride_wn,  # in words of w_ptr's type
    stride_om,
    ids_ptr,  # EXPERTS: int32/int64 [T * k] expert id of each slot; else unused (None)
    stride_we,  # EXPERTS: words of w_ptr's type between experts
    K_INTERP: tl.constexpr,  # K as a constexpr under TRITON_INTERPRET, else 0 (matvec.py)
    EXPERTS: tl.constexpr,  # w_ptr is [n_expert, N, words]; grid axis 1 = slots (see top)
    SLOTS_PER_X: tl.constexpr,  # EXPERTS: consecutive slots that read one x row (k or 1)
    M_PAD: tl.constexpr,  # next power of two >= M
    BLOCK_N: tl.constexpr,
    S: tl.constexpr,  # blocks per tile
    R: tl.constexpr,  # tiles per loop step
    EVEN: tl.constexpr,  # no step overruns K
    FMT: tl.constexpr,  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K
    WPB: tl.constexpr,  # words of w_ptr's type a block (the format's block bytes / word size)
    DP4A: tl.constexpr,  # the dp4a instruction (off under the interpreter)
    PDL: tl.constexpr = False,
):
    KQ: tl.constexpr = FMT == Q4_K or FMT == Q5_K  # Q5_K: Q4_K's layout with qh before qs
    Q6: tl.constexpr = FMT == Q6_K
    BV: tl.constexpr = 256 if (KQ or Q6) else 32  # values per weight block
    QW: tl.constexpr = 8 if (KQ or Q6) else 4  # lanes per block
    if PDL:
        wait_for_inputs()
    xd_ptr = xd_ptr.to(tl.pointer_type(tl.float32))
    if EXPERTS:  # slot s = program_id(1): expert ids[s], x row s // SLOTS_PER_X, output row s
        slot = tl.program_id(1)
        w_ptr += tl.load(ids_ptr + slot).to(tl.int64) * stride_we
        x_row = slot // SLOTS_PER_X
        xq_ptr += x_row * (K // 4)
        xd_ptr += x_row * (2 * (K // 32))
        out_ptr += slot * stride_om
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    j = tl.arange(0, S * QW)[:, None]  # [lanes, 1]
    sb = j // QW
    li = j % QW
    hdr_p = w_ptr + rows_c[None, :] * stride_wn + sb * WPB  # [lanes, BLOCK_N]
    m3 = tl.arange(0, M_PAD)[:, None, None]  # [M_PAD, 1, 1]
    kw = K // 4  # x words per row
    kb = K // 32  # x blocks per row
    # x words of the lane's first value, and its first x block, in block sb of the tile
    if KQ:
        x_w = sb * 64 + 16 * (li // 2) + 4 * (li % 2)  # + 8: the high nibbles' block
        x_b = sb * 8 + 2 * (li // 2)
    elif Q6:
        x_w = sb * 64 + 32 * (li // 4) + 2 * (li % 4)  # + 8 k for k = 0..3
        x_b = sb * 8 + 4 * (li // 4)
    elif FMT == Q8_0:
        x_w = sb * 8 + 2 * li
        x_b = sb
    else:  # Q4_0, Q4_1, Q5_0, Q5_1: the low nibbles' word; the high nibbles' word is 4 further
        x_w = sb * 8 + li
        x_b = sb
    xq_p = xq_ptr + m3 * kw + x_w[None]  # [M_PAD, lanes, 1]
    xd_p = xd_ptr + m3 * (2 * kb) + 2 * x_b[None]
    acc = tl.zeros([M_PAD, S * QW, BLOCK_N], dtype=tl.float32)
    nblk = K // BV
    for k0 in range(0, K_INTERP if K_INTERP > 0 else K, BV * S * R):
        for r in tl.static_range(R):
            hp = hdr_p + r * S * WPB
            ok = k0 // BV + r * S + sb < nblk  # [lanes, 1]
            xok = ok[None] & (m3 < M)
            XW = r * S * BV // 4  # this tile's offset in x words
            XB = r * S * BV // 32
            if FMT == Q8_0:
                d = _masked_load(hp, ok, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
                a, b, dx, _sq = _x_block(xq_p, xd_p, XW, XB, xok, DP4A)
                w0 = _word(hp, 1 + 4 * li, ok, EVEN)
                w1 = _word(hp, 3 + 4 * li, ok, EVEN)
                dot = _dp4a(w1[None], b, _dp4a(w0[None], a, tl.zeros_like(a), DP4A), DP4A)
                acc += d[None] * (dx * dot.to(tl.float32))
            elif KQ:
                hdr = _masked_load(hp, ok, EVEN)  # d | dmin << 16 | scales[0..3] << 32
                h32 = hdr.to(tl.int32)
                d = _f16_lo(h32)
                dmin = _f16_lo(h32 >> 16)
                w1 = _masked_load(hp + 1, ok, EVEN)
                wa = (hdr >> 32).to(tl.int32)
                sh = 16 * ((li // 2) % 2)
                upper = li >= 4
                sc, mn = _q4_k_scale_min(wa, w1.to(tl.int32), (w1 >> 32).to(tl.int32), sh, upper)
                sc_h, mn_h = _q4_k_scale_min(
                    wa, w1.to(tl.int32), (w1 >> 32).to(tl.int32), sh + 8, upper
                )
                dot = tl.zeros([M_PAD, S * QW, BLOCK_N], dtype=tl.int32)
                dot_h = tl.zeros([M_PAD, S * QW, BLOCK_N], dtype=tl.int32)
                sq = tl.zeros([M_PAD, S * QW, 1], dtype=tl.int32)
                sq_h = tl.zeros([M_PAD, S * QW, 1], dtype=tl.int32)
                for i in tl.static_range(2):  # the lane's two 8-byte words of qs
                    if FMT == Q5_K:  # words 2..5: qh; byte v's bit 2c, 2c + 1: the fifth bits
                        qs = _masked_load(hp + 6 + 2 * li + i, ok, EVEN)
                        qh = _masked_load(hp + 2 + 2 * (li % 2) + i, ok, EVEN)
                    else:
                        qs = _masked_load(hp + 2 + 2 * li + i, ok, EVEN)
                    for e in tl.static_range(2):  # their 4-byte halves
                        q = (qs >> (32 * e)).to(tl.int32)
                        q_lo = q & _NIB
                        q_hi = (q >> 4) & _NIB
                        if FMT == Q5_K:
                            h = (qh >> (32 * e)).to(tl.int32) >> (2 * (li // 2))
                            q_lo = q_lo | ((h & 0x01010101) << 4)
                            q_hi = q_hi | ((h & 0x02020202) << 3)
                        a = tl.load(xq_p + XW + 2 * i + e, mask=xok, other=0)
                        b = tl.load(xq_p + XW + 8 + 2 * i + e, mask=xok, other=0)
                        dot = _dp4a(q_lo[None], a, dot, DP4A)
                        dot_h = _dp4a(q_hi[None], b, dot_h, DP4A)
                        sq = _dp4a(_ONES, a, sq, DP4A)
                        sq_h = _dp4a(_ONES, b, sq_h, DP4A)
                dx = tl.load(xd_p + 2 * XB, mask=xok, other=0.0)
                dx_h = tl.load(xd_p + 2 * XB + 2, mask=xok, other=0.0)
                acc += (d * sc)[None] * (dx * dot.to(tl.float32))
                acc -= (dmin * mn)[None] * (dx * sq.to(tl.float32))
                acc += (d * sc_h)[None] * (dx_h * dot_h.to(tl.float32))
                acc -= (dmin * mn_h)[None] * (dx_h * sq_h.to(tl.float32))
            elif Q6:  # lane li = half hh (li // 4), l0 = 8 (li % 4)
                hh = li // 4
                l0h = 4 * (li % 4)  # l0 in halfwords
                qh0 = _word(hp, 64 + 16 * hh + l0h, ok, EVEN)
                qh1 = _word(hp, 66 + 16 * hh + l0h, ok, EVEN)
                d = _masked_load(hp + 104, ok, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
                up = 24 - 8 * ((li % 4) // 2)  # scale byte g = l0 // 16 of its halfword
                for k in tl.static_range(4):
                    ql0 = _word(hp, 32 * hh + 16 * (k % 2) + l0h, ok, EVEN)
                    ql1 = _word(hp, 32 * hh + 16 * (k % 2) + l0h + 2, ok, EVEN)
                    c0 = ((ql0 >> (4 * (k // 2))) & _NIB) | (((qh0 >> (2 * k)) & 0x03030303) << 4)
                    c1 = ((ql1 >> (4 * (k // 2))) & _NIB) | (((qh1 >> (2 * k)) & 0x03030303) << 4)
                    a, b, dx, sq = _x_block(xq_p, xd_p, XW + 8 * k, XB + k, xok, DP4A)
                    dot = _dp4a(c1[None], b, _dp4a(c0[None], a, -32 * sq, DP4A), DP4A)
                    sc_w = _masked_load(hp + 96 + 4 * hh + k, ok, EVEN).to(tl.int32)
                    sc = ((sc_w << up) >> 24).to(tl.float32)
                    acc += (d * sc)[None] * (dx * dot.to(tl.float32))
            else:  # Q4_0, Q4_1, Q5_0, Q5_1: a word of nibbles (Q5: and their fifth bits)
                if FMT == Q4_0 or FMT == Q5_0:  # halfwords: d, (Q5_0: qh lo, qh hi), then qs
                    d = _masked_load(hp, ok, EVEN).to(tl.float16, bitcast=True).to(tl.float32)
                    if FMT == Q5_0:
                        qh = _word(hp, 1, ok, EVEN)
                        w = _word(hp, 3 + 2 * li, ok, EVEN)
                    else:
                        w = _word(hp, 1 + 2 * li, ok, EVEN)
                else:  # words: d | m << 16, (Q5_1: qh), then qs
                    hdr = _masked_load(hp, ok, EVEN)
                    d = _f16_lo(hdr)
                    mw = _f16_lo(hdr >> 16)
                    if FMT == Q5_1:
                        qh = _masked_load(hp + 1, ok, EVEN)
                        w = _masked_load(hp + 2 + li, ok, EVEN)
                    else:
                        w = _masked_load(hp + 1 + li, ok, EVEN)
                lo = tl.load(xq_p + XW, mask=xok, other=0)
                hi = tl.load(xq_p + XW + 4, mask=xok, other=0)
                dx = tl.load(xd_p + 2 * XB, mask=xok, other=0.0)
                sq = _dp4a(_ONES, hi, _dp4a(_ONES, lo, tl.zeros_like(lo), DP4A), DP4A)
                q_lo = w & _NIB
                q_hi = (w >> 4) & _NIB
                if FMT == Q5_0 or FMT == Q5_1:
                    q_lo = q_lo | _fifth_bits(qh >> (4 * li))
                    q_hi = q_hi | _fifth_bits(qh >> (16 + 4 * li))
                if FMT == Q4_0:
                    off = -8 * sq
                elif FMT == Q5_0:
                    off = -16 * sq
                else:
                    off = tl.zeros_like(sq)
                dot = _dp4a(q_lo[None], lo, off, DP4A)
                dot = _dp4a(q_hi[None], hi, dot, DP4A)
                if FMT == Q4_1 or FMT == Q5_1:  # + m * sum(x)
                    acc += d[None] * (dx * dot.to(tl.float32)) + mw[None] * (dx * sq.to(tl.float32))
                else:
                    acc += d[None] * (dx * dot.to(tl.float32))
        hdr_p += S * R * WPB
        xq_p += S * R * BV // 4
        xd_p += S * R * BV // 16
    out = tl.sum(acc, axis=1)  # [M_PAD, BLOCK_N]
    m2 = tl.arange(0, M_PAD)[:, None]
    tl.store(out_ptr + m2 * stride_om + rows[None, :], out, mask=(m2 < M) & (rows < N)[None, :])

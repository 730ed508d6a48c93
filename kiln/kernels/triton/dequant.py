"""Dequantization in registers, shared by the kernels that read GGUF blocks (mat-vec, embedding;
the coming GEMM): the format ids and the per-value dequantizers of the block formats.

The byte layouts are the ones documented at the top of kiln/quant/legacy.py and k_quants.py;
each helper does the reference dequantizer's fp32 operations in the same order, so a kernel
launched with FMA contraction off (the embedding) is bit-exact with it.

Only @triton.jit functions and the format-id constexprs live here; kiln/kernels/formats.py maps
GGML types onto the ids and says which kernel supports which format.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Format ids (the kernels' FMT constexpr).
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
    return _f16_of(tl.load(p), tl.load(p + 1))


@triton.jit
def _f16_of(lo, hi):
    """The f16 of its two little-endian bytes (uint8), as fp32."""
    return (lo.to(tl.uint16) | (hi.to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# Each format's dequantization is a fetch (only the loads of the bytes it reads, returned raw as
# a tuple: a kernel may issue the next step's fetch before it decodes this one's, so that their
# latency overlaps the work) and a decode (the reference's fp32 operations on those bytes).
# _dequant_legacy and _dequant_k are the two together.


@triton.jit
def _fetch_legacy(blk, j, FMT: tl.constexpr):
    """The bytes _decode_legacy reads (blk: byte pointers [BLOCK_N, S, 1] to block starts; j:
    [1, 1, 32] value index in the block): (d's two bytes, m's two bytes, the high-bit byte, the
    quant byte); a format without a part repeats another (no load)."""
    nib_byte = j % 16
    lo = tl.load(blk)
    hi = tl.load(blk + 1)
    if FMT == Q8_0:
        q = tl.load(blk + 2 + j)
        return lo, hi, lo, hi, q, q
    elif FMT == Q4_0:
        q = tl.load(blk + 2 + nib_byte)
        return lo, hi, lo, hi, q, q
    elif FMT == Q4_1:
        q = tl.load(blk + 4 + nib_byte)
        return lo, hi, tl.load(blk + 2), tl.load(blk + 3), q, q
    elif FMT == Q5_0:
        return lo, hi, lo, hi, tl.load(blk + 2 + j // 8), tl.load(blk + 6 + nib_byte)
    else:  # Q5_1
        m_lo, m_hi = tl.load(blk + 2), tl.load(blk + 3)
        return lo, hi, m_lo, m_hi, tl.load(blk + 4 + j // 8), tl.load(blk + 8 + nib_byte)


@triton.jit
def _decode_legacy(raw, j, FMT: tl.constexpr):
    """fp32 [BLOCK_N, S, 32]: the values of _fetch_legacy's bytes."""
    d_lo, d_hi, m_lo, m_hi, hbyte, qbyte = raw
    nib_shift = (j // 16) * 4
    d = _f16_of(d_lo, d_hi)
    if FMT == Q8_0:
        w = qbyte.to(tl.int8, bitcast=True).to(tl.float32) * d
    elif FMT == Q4_0:
        q = (qbyte >> nib_shift) & 0x0F
        w = d * (q.to(tl.float32) - 8.0)
    elif FMT == Q4_1:
        q = (qbyte >> nib_shift) & 0x0F
        w = d * q.to(tl.float32) + _f16_of(m_lo, m_hi)
    elif FMT == Q5_0:
        hb = (hbyte >> (j % 8)) & 1
        q = ((qbyte >> nib_shift) & 0x0F) | (hb << 4)
        w = d * (q.to(tl.float32) - 16.0)
    else:  # Q5_1
        hb = (hbyte >> (j % 8)) & 1
        q = ((qbyte >> nib_shift) & 0x0F) | (hb << 4)
        w = d * q.to(tl.float32) + _f16_of(m_lo, m_hi)
    return w


@triton.jit
def _dequant_legacy(blk, j, FMT: tl.constexpr):
    """blk: byte pointers [BLOCK_N, S, 1] to block starts; j: [1, 1, 32] value index in block
    -> fp32 [BLOCK_N, S, 32]."""
    return _decode_legacy(_fetch_legacy(blk, j, FMT), j, FMT)


@triton.jit
def _scale_min_k4(blk, s):
    """Q4_K/Q5_K 6-bit (scale, min) of sub-block s ([1, 8, 1]) of super-blocks at blk."""
    a = tl.load(blk + 4 + s)  # scales[s]
    b = tl.load(blk + 8 + s)  # scales[s + 4]
    c = tl.load(blk + 4 + tl.where(s >= 4, s - 4, s))  # scales[s - 4] (used for s >= 4)
    return _scale_min_of(a, b, c, s)


@triton.jit
def _scale_min_of(a, b, c, s):
    """(scale, min) as fp32 from scales[s], scales[s + 4] and scales[s - 4] (bytes)."""
    sc = tl.where(s < 4, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(s < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _fetch_k(blk, s, j, FMT: tl.constexpr):
    """The bytes _decode_k reads (blk: byte pointers [BLOCK_N, 1, 1] to super-block starts; s:
    [1, 8, 1] sub-block of 32; j: [1, 1, 32]). Q6_K: (ql, qh, the sub-block scale, d's two
    bytes); Q4_K/Q5_K: (d's and dmin's two bytes, scales[s], scales[s + 4], scales[s - 4],
    the quant byte, the high-bit byte); a format without a part repeats another (no load)."""
    if FMT == Q6_K:
        h = s // 4
        qq = s % 4
        ql = tl.load(blk + 64 * h + 32 * (qq % 2) + j)
        qh = tl.load(blk + 128 + 32 * h + j)
        sc = tl.load(blk + 192 + 2 * s + j // 16)
        d_lo, d_hi = tl.load(blk + 208), tl.load(blk + 209)
        return ql, qh, sc, d_lo, d_hi, ql, ql, ql, ql
    else:
        d_lo, d_hi = tl.load(blk), tl.load(blk + 1)
        m_lo, m_hi = tl.load(blk + 2), tl.load(blk + 3)
        a = tl.load(blk + 4 + s)  # scales[s]
        b = tl.load(blk + 8 + s)  # scales[s + 4]
        c = tl.load(blk + 4 + tl.where(s >= 4, s - 4, s))  # scales[s - 4] (used for s >= 4)
        if FMT == Q4_K:
            q = tl.load(blk + 16 + 32 * (s // 2) + j)
            return d_lo, d_hi, m_lo, m_hi, a, b, c, q, q
        else:  # Q5_K
            q = tl.load(blk + 48 + 32 * (s // 2) + j)
            return d_lo, d_hi, m_lo, m_hi, a, b, c, q, tl.load(blk + 16 + j)


@triton.jit
def _decode_k(raw, s, j, FMT: tl.constexpr):
    """fp32 [BLOCK_N, 8, 32] (value 32 * s + j): the values of _fetch_k's bytes."""
    if FMT == Q6_K:
        ql8, qh8, sc8, d_lo, d_hi, _a, _b, _c, _d = raw
        qq = s % 4
        ql = (ql8 >> ((qq // 2) * 4)) & 0x0F
        qh = (qh8 >> (2 * qq)) & 3
        q = (ql | (qh << 4)).to(tl.int32) - 32
        sc = sc8.to(tl.int8, bitcast=True).to(tl.float32)
        w = (_f16_of(d_lo, d_hi) * sc) * q.to(tl.float32)
    else:
        d_lo, d_hi, m_lo, m_hi, a, b, c, q8, qh8 = raw
        sc, mn = _scale_min_of(a, b, c, s)
        q = (q8 >> ((s % 2) * 4)) & 0x0F
        if FMT == Q5_K:
            q = q | (((qh8 >> s) & 1) << 4)
        w = (_f16_of(d_lo, d_hi) * sc) * q.to(tl.float32) - _f16_of(m_lo, m_hi) * mn
    return w


@triton.jit
def _dequant_k(blk, s, j, FMT: tl.constexpr):
    """blk: byte pointers [BLOCK_N, 1, 1] to super-block starts; s: [1, 8, 1] sub-block of 32;
    j: [1, 1, 32] -> fp32 [BLOCK_N, 8, 32] (value 32 * s + j)."""
    return _decode_k(_fetch_k(blk, s, j, FMT), s, j, FMT)


# The quant domain (the GEMM's MatmulConfig.quants): a group of values (32; Q6_K: 16, its scale's
# span) as integers exact in bf16 and two per-row factors, value = ds * Q - coef: the GEMM
# multiplies Q on tensor cores and applies ds and coef to the group's partial sums (coef times
# the group's sum of x), so no value is scaled or rounded one by one. The 4- to 6-bit quants
# become Q = 128 + q by their bits (_magic_bf16: no int -> float convert); Q8_0's signed quants
# are converted (|q| <= 128 is exact in bf16) and need no coef.


@triton.jit
def _magic_bf16(q):
    """128 + q as bf16 for integers q in 0..127: 0x4300 is 128.0, whose 7 mantissa bits are q."""
    return (q.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nibbles_of_words(words):
    """uint32 [BLOCK_N, 8] (32 quant bytes, little-endian) -> (128 + the low nibbles, 128 + the
    high nibbles) as bf16 [BLOCK_N, 32] each, in byte order: two PRMTs and six bit operations a
    word by inline PTX (Triton holds a uint8 tensor one byte a register and would unpack and
    repack them). Compiled kernels only: the interpreter runs _magic_bf16 on the bytes."""
    v0, v1, v2, v3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
        """{
        .reg .b32 a, b, c;
        prmt.b32 a, $8, 0, 0x4140;
        prmt.b32 b, $8, 0, 0x4342;
        lop3.b32 c, a, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 {$0, $1}, c;
        lop3.b32 c, b, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 {$2, $3}, c;
        shr.u32 a, a, 4;
        shr.u32 b, b, 4;
        lop3.b32 c, a, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 {$4, $5}, c;
        lop3.b32 c, b, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 {$6, $7}, c;
        }""",
        "=h,=h,=h,=h,=h,=h,=h,=h,r",
        [words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=1,
    )
    n: tl.constexpr = words.shape[0]
    # join(join(v0, v2), join(v1, v3))[w, p, q] is byte 4 w + 2 p + q
    lo = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (n, 32))
    hi = tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), (n, 32))
    return lo, hi


@triton.jit
def _k4_fetch(blk, FMT: tl.constexpr, WORDS: tl.constexpr = False):
    """The bytes of the Q4_K/Q5_K super-blocks at blk (byte pointers [BLOCK_N, 1]) that the
    quant domain reads, as loaded (no use of them: a kernel may fetch the next super-block
    before it decodes this one, _k4_pair): the 16 header bytes (d, dmin, the 12 bytes of 6-bit
    scales and mins) [BLOCK_N, 1] each, the 4 x 32 quant bytes [BLOCK_N, 32] (WORDS, Q4_K: as
    4 x 8 uint32 words [BLOCK_N, 8]) and Q5_K's 32 high-bit bytes (Q4_K: the first quant bytes
    again, no load)."""
    if WORDS:  # Q4_K: the quant bytes as uint32 words [BLOCK_N, 8] (_nibbles_of_words)
        qs = (blk + 16).to(tl.pointer_type(tl.uint32)) + tl.arange(0, 8)[None, :]
        step = 8
    else:
        qs = blk + (16 if FMT == Q4_K else 48) + tl.arange(0, 32)[None, :]
        step = 32
    q0 = tl.load(qs)
    qh = q0
    if FMT == Q5_K:
        qh = tl.load(blk + 16 + tl.arange(0, 32)[None, :])
    return (
        tl.load(blk), tl.load(blk + 1), tl.load(blk + 2), tl.load(blk + 3),
        tl.load(blk + 4), tl.load(blk + 5), tl.load(blk + 6), tl.load(blk + 7),
        tl.load(blk + 8), tl.load(blk + 9), tl.load(blk + 10), tl.load(blk + 11),
        tl.load(blk + 12), tl.load(blk + 13), tl.load(blk + 14), tl.load(blk + 15),
        q0, tl.load(qs + step), tl.load(qs + 2 * step), tl.load(qs + 3 * step), qh,
    )  # fmt: skip


@triton.jit
def _k4_scale_min_of(raw, s: tl.constexpr):
    """(scale, min) of group s (a constant) from _k4_fetch's header bytes, fp32."""
    if s < 4:
        sc = raw[4 + s] & 63
        mn = raw[8 + s] & 63
    else:
        a = raw[4 + s]  # scales[s]
        b = raw[8 + s]  # scales[s + 4]
        sc = (b & 15) | ((raw[s] >> 6) << 4)  # raw[s] = scales[s - 4]
        mn = (b >> 4) | ((a >> 6) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _k4_pair(raw, pair: tl.constexpr, FMT: tl.constexpr, WORDS: tl.constexpr = False):
    """Q4_K/Q5_K groups 2 pair and 2 pair + 1 of _k4_fetch's super-blocks, which share their 32
    quant bytes (low and high nibbles), in the quant domain: (Q, ds, coef) of the first, then
    of the second (see _legacy_quants)."""
    d = _f16_of(raw[0], raw[1])
    dmin = _f16_of(raw[2], raw[3])
    if WORDS:
        q_lo, q_hi = _nibbles_of_words(raw[16 + pair])
    else:
        byte = raw[16 + pair]
        lo = byte & 0x0F
        hi = byte >> 4
        if FMT == Q5_K:
            lo = lo | (((raw[20] >> (2 * pair)) & 1) << 4)
            hi = hi | (((raw[20] >> (2 * pair + 1)) & 1) << 4)
        q_lo = _magic_bf16(lo)
        q_hi = _magic_bf16(hi)
    sc0, mn0 = _k4_scale_min_of(raw, 2 * pair)
    sc1, mn1 = _k4_scale_min_of(raw, 2 * pair + 1)
    ds0 = d * sc0
    ds1 = d * sc1
    return q_lo, ds0, 128.0 * ds0 + dmin * mn0, q_hi, ds1, 128.0 * ds1 + dmin * mn1


@triton.jit
def _q6k_quad(blk, h: tl.constexpr, half: tl.constexpr, d):
    """Q6_K's four 16-value groups 2 (4 h + qq) + half, qq = 0..3, of the super-blocks at blk
    (byte pointers [BLOCK_N, 1]; d: their f16 factor as fp32), which share their low-bit and
    high-bit bytes, in the quant domain: (Q, ds, coef) of each in qq order (see _legacy_quants)."""
    i = 16 * half + tl.arange(0, 16)[None, :]
    ql_a = tl.load(blk + 64 * h + i)  # qq 0 (low nibbles) and 2 (high)
    ql_b = tl.load(blk + 64 * h + 32 + i)  # qq 1 and 3
    qh = tl.load(blk + 128 + 32 * h + i)  # 2 bits of each qq
    q0 = (ql_a & 0x0F) | ((qh & 3) << 4)
    q1 = (ql_b & 0x0F) | (((qh >> 2) & 3) << 4)
    q2 = (ql_a >> 4) | (((qh >> 4) & 3) << 4)
    q3 = (ql_b >> 4) | ((qh >> 6) << 4)
    t = 8 * h + half  # the scale of qq is at 192 + t + 2 qq
    ds0 = d * tl.load(blk + 192 + t).to(tl.int8, bitcast=True).to(tl.float32)
    ds1 = d * tl.load(blk + 194 + t).to(tl.int8, bitcast=True).to(tl.float32)
    ds2 = d * tl.load(blk + 196 + t).to(tl.int8, bitcast=True).to(tl.float32)
    ds3 = d * tl.load(blk + 198 + t).to(tl.int8, bitcast=True).to(tl.float32)
    return (
        _magic_bf16(q0), ds0, 160.0 * ds0, _magic_bf16(q1), ds1, 160.0 * ds1,
        _magic_bf16(q2), ds2, 160.0 * ds2, _magic_bf16(q3), ds3, 160.0 * ds3,
    )  # fmt: skip


@triton.jit
def _legacy_quants(blk, FMT: tl.constexpr):
    """A legacy block (32 values) of the rows in the quant domain -> (Q bf16 [BLOCK_N, 32], ds,
    coef fp32 [BLOCK_N, 1]) with value (the reference's) = ds * Q - coef. blk: byte pointers
    [BLOCK_N, 1] to the block; Q is read as [BLOCK_N, 2, 16] (values i and 16 + i share byte i)
    and reshaped. The K-quants go by _k4_pair and _q6k_quad."""
    blk3 = tl.expand_dims(blk, 2)  # [BLOCK_N, 1, 1]
    h = tl.arange(0, 2)[None, :, None]  # [1, 2, 1]: the nibble
    i = tl.arange(0, 16)[None, None, :]  # [1, 1, 16]: the byte
    d = _f16_at(blk)
    if FMT == Q8_0:
        q8 = tl.load(blk3 + 2 + 16 * h + i).to(tl.int8, bitcast=True)
        q = q8.to(tl.float32).to(tl.bfloat16)
        coef = 0.0 * d
    elif FMT == Q4_0:
        q = _magic_bf16((tl.load(blk3 + 2 + i) >> (4 * h)) & 0x0F)
        coef = 136.0 * d  # value = d * (q - 8)
    elif FMT == Q4_1:
        q = _magic_bf16((tl.load(blk3 + 4 + i) >> (4 * h)) & 0x0F)
        coef = 128.0 * d - _f16_at(blk + 2)  # value = d * q + m
    elif FMT == Q5_0:
        j = 16 * h + i
        hb = (tl.load(blk3 + 2 + j // 8) >> (j % 8)) & 1
        q = _magic_bf16(((tl.load(blk3 + 6 + i) >> (4 * h)) & 0x0F) | (hb << 4))
        coef = 144.0 * d  # value = d * (q - 16)
    else:  # Q5_1
        j = 16 * h + i
        hb = (tl.load(blk3 + 4 + j // 8) >> (j % 8)) & 1
        q = _magic_bf16(((tl.load(blk3 + 8 + i) >> (4 * h)) & 0x0F) | (hb << 4))
        coef = 128.0 * d - _f16_at(blk + 2)
    return tl.reshape(q, (blk.shape[0], 32)), d, coef

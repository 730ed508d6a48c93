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

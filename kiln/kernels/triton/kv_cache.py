"""Quantized KV-cache rows in the kernels: the q8_0 and q4_0 block types of kiln/quant/kv.py
(llama.cpp's -ctk/-ctv), written by qkv_norm_rope and read by the attention kernels.

A pool of a block type is uint8 [S, Hkv, D / 32 * BS]: each head's row holds the bytes of D / 32
GGML blocks of BS bytes (q8_0: 34, an f16 d and 32 int8 quants, value = d * q; q4_0: 18, an f16
d and 16 bytes of nibbles, value j < 16 the low nibble of byte j and value j >= 16 the high
nibble of byte j - 16, value = d * (q - 8)), split as kiln/quant/kv.py's `to_split` says: the
D / 32 scales first, then the blocks' quants, so the quants are contiguous and as aligned as the
row. Rows are rotated first where kiln/quant/kv.py says (`_rotate`: the Hadamard matrix of 64 on
each 64 values). `_quantize_row` quantizes one head's row as kiln/quant/legacy.py's
_quantize_q8_0 / _quantize_q4_0 do (ggml's reference quantizers): the same fp32 operations with
correctly rounded divisions, so both write the same bytes. `_load_block_rows` dequantizes head
rows of a pool for the attention kernels (in two parts, `_fetch_blocks` and `_dequant_blocks`,
where a kernel loads one step ahead), and `_rotate_rows` rotates their output back where V's
rows are stored rotated.

Only @triton.jit functions and the format-id constexprs live here.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The KV formats (the kernels' K_FMT / V_FMT constexprs): a float pool (its own dtype), q8_0, q4_0.
KV_FLOAT: tl.constexpr = tl.constexpr(0)
KV_Q8_0: tl.constexpr = tl.constexpr(1)
KV_Q4_0: tl.constexpr = tl.constexpr(2)


@triton.jit
def _block_bytes(FMT: tl.constexpr):
    """Bytes of one block of 32 values."""
    if FMT == KV_Q8_0:
        return 34
    else:
        return 18


@triton.jit
def _head_ptr(ptr, h, D, FMT: tl.constexpr):
    """Where head h's row of pool row 0 starts (rows of heads of D values; the pool's elements,
    or bytes for a block type)."""
    if FMT == KV_FLOAT:
        return ptr + h * D
    else:
        return ptr + h * (D // 32) * _block_bytes(FMT)


@triton.jit
def _scale_ptrs(row_ptrs, blk):
    """f16 pointers to the scales of blocks blk of head rows starting at byte pointers row_ptrs
    (the row's first bytes: kiln/quant/kv.py's split layout)."""
    return (row_ptrs + blk * 2).to(tl.pointer_type(tl.float16))


@triton.jit
def _quant_ptrs(row_ptrs, W):
    """Byte pointers to where the quants of head rows of W values start (after the W / 32
    scales)."""
    return row_ptrs + (W // 32) * 2


@triton.jit
def _fetch_blocks(row_ptrs, row_ok, W, W_PAD: tl.constexpr, FMT: tl.constexpr):
    """The raw contents of values 0..W-1 of N head rows of a block type (row_ptrs [N]: byte
    pointers to where each row starts; rows with row_ok False and blocks past W read as 0) ->
    (the f16 scales [N, NB], the quants: q8_0 uint8 [N, NB, 32], value j's byte; q4_0 uint8
    [N, NB, 2, 16], at [.., h, i] the byte holding value 16 h + i's nibble, each byte loaded
    once for both halves), NB = W_PAD // 32. The scales come in one load a row and the quants as
    contiguous runs (aligned as the row is: kiln/quant/kv.py's split layout; W a multiple of 32,
    W_PAD a power of two >= W and >= 32). Only loads: their latency can overlap other work until
    _dequant_blocks reads them."""
    NB: tl.constexpr = W_PAD // 32
    blk = tl.arange(0, NB)
    ok = row_ok[:, None] & (blk[None, :] < W // 32)  # [N, NB]
    d = tl.load(_scale_ptrs(row_ptrs[:, None], blk[None, :]), mask=ok, other=0.0)
    qp = _quant_ptrs(row_ptrs, W)[:, None, None]
    j = tl.arange(0, 32)[None, None, :]
    if FMT == KV_Q8_0:
        q = tl.load(qp + blk[None, :, None] * 32 + j, mask=ok[:, :, None], other=0)
    else:  # the high half's pointers are the low half's: a broadcast the load reads once
        i = tl.arange(0, 16)[None, None, :]
        ptrs = (qp + blk[None, :, None] * 16 + i)[:, :, None, :]
        ptrs = tl.broadcast_to(ptrs, (row_ptrs.shape[0], NB, 2, 16))
        q = tl.load(ptrs, mask=ok[:, :, None, None], other=0)
    return d, q


@triton.jit
def _dequant_blocks(d, q, W_PAD: tl.constexpr, FMT: tl.constexpr, DT: tl.constexpr):
    """[N, W_PAD] in DT: the values of _fetch_blocks' (d, q), each d * q rounded once to DT.
    DT f16: the quant becomes an exact f16 by its bits, less an offset (q8_0: 0x6400 | u is the
    f16 1024 + u for a byte u; q4_0: the low nibble n gives 0x6400 | n = 1024 + n, the high one
    0x5400 | 16 n = 64 + n, where the f16 step is 1/16), times d in f16: the product of two f16
    values is exact in fp32, so rounding it once to f16 is what the f16 multiply does. No
    int-to-float or float-to-half conversion (16 a clock on an SM, against 64 or more for the
    logic and half-precision operations used instead) and no shifts: on sm_90 the decode step
    went from 1101 to 841 instructions for q8_0 and from 1680 to 727 for q4_0. Other DT: fp32
    products, then rounded to DT."""
    N: tl.constexpr = q.shape[0]
    if FMT == KV_Q8_0:
        if DT == tl.float16:
            u = q.to(tl.uint16) ^ 0x6480  # (byte ^ 0x80) | 0x6400 = 1024 + x + 128
            x = (u.to(tl.float16, bitcast=True) - 1152.0) * d[:, :, None]
        else:
            x = (q.to(tl.int8, bitcast=True).to(tl.float32) * d.to(tl.float32)[:, :, None]).to(DT)
    else:
        hi = (tl.arange(0, 2) == 1)[None, None, :, None]  # [N, NB, 2, 16]: value 16 h + i
        if DT == tl.float16:
            mask = tl.where(hi, 0xF0, 0x0F).to(tl.uint16)
            base = tl.where(hi, 0x5400, 0x6400).to(tl.uint16)
            off = tl.where(hi, 72.0, 1032.0).to(tl.float16)
            u = (q.to(tl.uint16) & mask) | base
            x = (u.to(tl.float16, bitcast=True) - off) * d[:, :, None, None]
        else:
            nibble = (q >> tl.where(hi, 4, 0).to(tl.uint8)) & 0x0F
            x = ((nibble.to(tl.float32) - 8.0) * d.to(tl.float32)[:, :, None, None]).to(DT)
    return tl.reshape(x, (N, W_PAD))


@triton.jit
def _load_block_rows(row_ptrs, row_ok, W, W_PAD: tl.constexpr, FMT: tl.constexpr, DT: tl.constexpr):
    """[N, W_PAD] in DT: values 0..W-1 of N head rows of a block type, as _fetch_blocks reads
    them (rows with row_ok False and values >= W read as 0), rounded once to DT."""
    d, q = _fetch_blocks(row_ptrs, row_ok, W, W_PAD, FMT)
    return _dequant_blocks(d, q, W_PAD, FMT, DT)


@triton.jit
def _butterfly(y, N: tl.constexpr, S: tl.constexpr):
    """One stage of the fast Walsh-Hadamard transform of y [N]: values i and i + S (bit S of i
    clear) become (a + b, a - b). Sums over an axis of 2 and a select, no tl.join (see
    _load_block_rows)."""
    z = tl.reshape(y, (N // (2 * S), 2, S))
    c = tl.arange(0, 2)[None, :, None]
    plus = tl.sum(z, axis=1)[:, None, :]  # a + b
    minus = tl.sum(tl.where(c == 0, z, -z), axis=1)[:, None, :]  # a - b
    return tl.reshape(tl.where(c == 0, plus, minus), (N,))


@triton.jit
def _rotate(x, N: tl.constexpr):
    """fp32 x [N] (N a power of two >= 64) with each 64 values multiplied by the Hadamard matrix
    of 64 / 8 (kiln/quant/kv.py's rotation: H[i, j] = (-1)^popcount(i & j) / 8, symmetric, its
    own inverse): six butterfly stages (6 N additions), then the exact scaling by 1/8, instead of
    the 64 N products of a [64, 64] matrix built in registers (the first form)."""
    y = _butterfly(x, N, 1)
    y = _butterfly(y, N, 2)
    y = _butterfly(y, N, 4)
    y = _butterfly(y, N, 8)
    y = _butterfly(y, N, 16)
    y = _butterfly(y, N, 32)
    return y * 0.125


@triton.jit
def _rotate_rows(x, M: tl.constexpr, N: tl.constexpr):
    """fp32 x [M, N] with each 64 values of every row rotated as _rotate does."""
    return tl.reshape(_rotate(tl.reshape(x, (M * N,)), M * N), (M, N))


@triton.jit
def _low_byte(y):
    """fp32 of integral values -> int32 0..255 (legacy.py's _low_byte: through int32)."""
    ok = tl.abs(y) < 2147483648.0
    return tl.where(ok, y, 0.0).to(tl.int32) & 0xFF


@triton.jit
def _recip(d):
    """1 / d correctly rounded (1 where d is 0: the caller discards it)."""
    return tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0, 1.0, d))


@triton.jit
def _quantize_row(head_ptr, x, D, BLOCK: tl.constexpr, FMT: tl.constexpr):
    """Store fp32 x [BLOCK] (values 0..D-1 of one head's row; D a multiple of 32, BLOCK a power
    of two >= D; values past D are not read into any stored block) as the row's D / 32 blocks
    at byte pointer head_ptr."""
    NB: tl.constexpr = BLOCK // 32
    xb = tl.reshape(x, (NB, 32))
    blk = tl.arange(0, NB)
    b_ok = blk < D // 32
    j = tl.arange(0, 32)
    d_ptrs = _scale_ptrs(head_ptr, blk)  # [NB]
    q_ptr = _quant_ptrs(head_ptr, D)
    if FMT == KV_Q8_0:
        d = tl.math.div_rn(tl.max(tl.abs(xb), axis=1), tl.full([NB], 127.0, tl.float32))
        inv = tl.where(d == 0, 0.0, _recip(d))
        v = xb * inv[:, None]
        a = tl.abs(v)
        fl = tl.floor(a)
        r = fl + tl.floor(2 * (a - fl))  # |round half away from zero|, gguf's np_roundf
        q = _low_byte(tl.where(v < 0, -r, r))
        tl.store(d_ptrs, d.to(tl.float16), mask=b_ok)
        tl.store(q_ptr + blk[:, None] * 32 + j[None, :], q.to(tl.uint8), mask=b_ok[:, None])
    else:
        # the value of largest magnitude, its sign kept (the first one on ties)
        at = tl.argmax(tl.abs(xb), axis=1, tie_break_left=True)
        mx = tl.sum(tl.where(j[None, :] == at[:, None], xb, 0.0), axis=1)
        d = mx * -0.125  # / -8: exact
        inv = tl.where(d == 0, 0.0, _recip(d))
        y = xb * inv[:, None] + 8.5
        q = tl.minimum(_low_byte(tl.where(y < 0, tl.ceil(y), tl.floor(y))), 15)  # trunc
        halves = tl.permute(tl.reshape(q, (NB, 2, 16)), (0, 2, 1))  # [NB, 16, 2]
        low, high = tl.split(halves)
        tl.store(d_ptrs, d.to(tl.float16), mask=b_ok)
        i = tl.arange(0, 16)
        packed = (low | (high << 4)).to(tl.uint8)
        tl.store(q_ptr + blk[:, None] * 16 + i[None, :], packed, mask=b_ok[:, None])

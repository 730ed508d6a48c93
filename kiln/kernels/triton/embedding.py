"""Embedding lookup straight from GGUF blocks: out[t, :] = dequantize(W[ids[t], :]) in float32.

Grid (T, cdiv(K, BLOCK_V)): program (t, c) reads the token id ids[t] on the device (no host
sync: the launch is CUDA-graph safe), then dequantizes values c * BLOCK_V .. + BLOCK_V of that
row and stores them contiguously. Tiles by format family (BLOCK_VALUES):
- float formats (1): w_ptr is a typed view (f32/f16/bf16) [V, K]; a [BLOCK_V] tile, K masked.
- legacy formats (32): a [BLOCK_V // 32, 32] tile of whole blocks (_dequant_legacy).
- K-quants (256): a [BLOCK_V // 256, 8, 32] tile of whole super-blocks (_dequant_k).
Blocks past the row's end are clamped to its last block, so the block loads need no mask; only
the store is masked. The dequant helpers are kernels/triton/dequant.py's (the mat-vec's too),
whose fp32 operations are the reference dequantizers' in the same order (kiln/quant/*.py): the
launcher turns FMA contraction off, so the result is bit-exact with kiln.ops.reference.embedding.

Only @triton.jit functions live here; kiln/kernels/embedding.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.dequant import _dequant_k, _dequant_legacy
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _embedding_kernel(
    ids_ptr,  # int32/int64 [T] token ids, each in [0, V) (not checked)
    w_ptr,  # float formats: typed [V, K]; block formats: uint8 [V, row_bytes]
    out_ptr,  # f32 [T, K] contiguous
    K,
    stride_wv,  # elements of w_ptr's type between rows
    FMT: tl.constexpr,  # format id of kiln/kernels/triton/dequant.py
    BLOCK_V: tl.constexpr,  # values per program: a power of two, a multiple of BLOCK_VALUES
    TYPE_SIZE: tl.constexpr,  # bytes per block (block formats)
    BLOCK_VALUES: tl.constexpr,  # values per block: 1 (floats), 32 (legacy), 256 (K-quants)
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()  # the ids are the previous kernel's output (the sampled token)
    t = tl.program_id(0)
    c = tl.program_id(1)
    # 64-bit row offset: a vocabulary of 152k rows of 4096 f32 is 2.5 GB.
    row = tl.load(ids_ptr + t).to(tl.int64)
    src = w_ptr + row * stride_wv
    dst = out_ptr + t.to(tl.int64) * K
    if BLOCK_VALUES == 1:
        k = c * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = k < K
        w = tl.load(src + k, mask=ok, other=0.0).to(tl.float32)  # f16/bf16 -> f32: exact
        tl.store(dst + k, w, mask=ok)
    elif BLOCK_VALUES == 32:
        S: tl.constexpr = BLOCK_V // 32
        b = c * S + tl.arange(0, S)[:, None]  # [S, 1] block of the row
        j = tl.arange(0, 32)[None, :]  # [1, 32] value in the block
        nb = K // 32
        blk = src + tl.minimum(b, nb - 1) * TYPE_SIZE  # past the end: the last block
        w = _dequant_legacy(blk, j, FMT)  # [S, 32]
        tl.store(dst + b * 32 + j, w, mask=b < nb)
    else:
        SB: tl.constexpr = BLOCK_V // 256
        b = c * SB + tl.arange(0, SB)[:, None, None]  # [SB, 1, 1] super-block of the row
        s = tl.arange(0, 8)[None, :, None]  # [1, 8, 1] sub-block of 32
        j = tl.arange(0, 32)[None, None, :]  # [1, 1, 32]
        nb = K // 256
        blk = src + tl.minimum(b, nb - 1) * TYPE_SIZE
        w = _dequant_k(blk, s, j, FMT)  # [SB, 8, 32]: value 256 b + 32 s + j
        tl.store(dst + b * 256 + s * 32 + j, w, mask=b < nb)

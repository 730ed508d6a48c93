"""Quantizing activation rows to q8_1 (kiln/quant/q8_1.py): the kernel of ops.quantize_q8_1 and
the helper the norm_quant fusion's kernel ends with (kernels/triton/norm.py), so the fused and
the unfused forms round the same way.

Per block of 32 values: d = amax / 127, q = roundf(x / d) (half away from zero, as trunc(v) +
trunc(2 (v - trunc(v))): exact, and the same under the interpreter), q = 0 where amax = 0,
s = d * sum(q) (the integer sum first: exact in any order). Both divisions are correctly
rounded (div_rn), as torch's are, so the kernel equals the reference bit for bit.

Only @triton.jit functions live here; kiln/kernels/quantize.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _store_q8_1_row(y, qs_ptr, ds_ptr, N, BLOCK: tl.constexpr):
    """y: fp32 [BLOCK] (one row, zeros past N; N a multiple of 32) -> its quants at qs_ptr
    (int8 [N]) and (d, s) of each block at ds_ptr (float32 [N / 32, 2])."""
    NB: tl.constexpr = BLOCK // 32
    v = tl.reshape(y, [NB, 32])
    amax = tl.max(tl.abs(v), axis=1)  # [NB]
    d = tl.math.div_rn(amax, 127.0)
    r = tl.math.div_rn(v, tl.where(amax > 0, d, 1.0)[:, None])
    t = r.to(tl.int32)  # truncates toward zero
    q = t + (2.0 * (r - t.to(tl.float32))).to(tl.int32)
    q = tl.where((amax > 0)[:, None], q, 0)
    s = d * tl.sum(q, axis=1).to(tl.float32)
    blk = tl.arange(0, NB)
    cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(qs_ptr + cols, q.to(tl.int8), mask=cols < N)
    ok = blk < N // 32
    tl.store(ds_ptr + 2 * blk, d, mask=ok)
    tl.store(ds_ptr + 2 * blk + 1, s, mask=ok)


@triton.jit
def _quantize_q8_1_kernel(
    x_ptr,  # [R, N] f32/f16/bf16, row stride stride_x, unit stride along N
    qs_ptr,  # int8 [R, N] contiguous
    ds_ptr,  # float32 [R, N / 32, 2] contiguous
    N,
    stride_x,
    BLOCK: tl.constexpr,  # next power of two >= N
    PDL: tl.constexpr = False,
):
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    y = tl.load(x_ptr + row * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    _store_q8_1_row(y, qs_ptr + row * N, ds_ptr + row * (N // 16), N, BLOCK)

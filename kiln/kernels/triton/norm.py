"""RMSNorm kernels: one program per row, the whole row held in registers (n <= 16384).

    y = x * rsqrt(mean(x^2) + eps) * w        (fp32 arithmetic, the order of reference.rms_norm)

Every variant goes through `_rms_norm_row`, so a fused launch (add_rms_norm, qk_norm, norm_quant)
rounds exactly as the unfused rms_norm launch with the same BLOCK does; norm_quant ends with the
quantize kernel's own `_store_q8_1_row` (kernels/triton/quantize.py).

Only @triton.jit functions live here; kiln/kernels/norm.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.pdl import wait_for_inputs
from kiln.kernels.triton.quantize import _store_q8_1_row


@triton.jit
def _rms_scale(x, n, eps):
    """x: fp32 [BLOCK] (zeros past n) -> the scalar rsqrt(sum(x^2) / n + eps)."""
    return tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)


@triton.jit
def _rms_norm_row(x, w_ptr, cols, mask, n, eps):
    """x: fp32 [BLOCK] (zeros past n) -> (x * scale) * w, fp32 [BLOCK]."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return x * _rms_scale(x, n, eps) * w


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [R, N] f32/f16/bf16, row stride stride_x, unit stride along N
    w_ptr,  # f32 [N]
    out_ptr,  # f32 [R, N], row stride stride_o
    N,
    stride_x,
    stride_o,
    eps,
    BLOCK: tl.constexpr,  # next power of two >= N
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _rms_norm_row(x, w_ptr, cols, mask, N, eps)
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,  # [R, N] f32/f16/bf16 (the block output), row stride stride_x
    r_ptr,  # [R, N] f32/f16/bf16 (the residual stream), row stride stride_r
    w_ptr,  # f32 [N]
    h_ptr,  # f32 [R, N] contiguous: residual + x
    out_ptr,  # f32 [R, N] contiguous: rms_norm(h)
    N,
    stride_x,
    stride_r,
    eps,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    h = r + x  # reference: residual + x
    tl.store(h_ptr + row * N + cols, h, mask=mask)
    y = _rms_norm_row(h, w_ptr, cols, mask, N, eps)
    tl.store(out_ptr + row * N + cols, y, mask=mask)


@triton.jit
def _qk_norm_kernel(
    q_ptr,  # [T, H, D], token stride stride_qt, head stride D, unit stride along D
    k_ptr,  # [T, HKV, D], token stride stride_kt, head stride D
    qw_ptr,  # f32 [D]
    kw_ptr,  # f32 [D]
    qo_ptr,  # f32 [T, H, D] contiguous
    ko_ptr,  # f32 [T, HKV, D] contiguous
    H,
    HKV,
    D,
    stride_qt,
    stride_kt,
    eps,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    """Program p normalizes head row j = p % (H + HKV) of token t = p // (H + HKV): query head j
    when j < H, else key head j - H (the order of a merged QKV row)."""
    if PDL:
        wait_for_inputs()
    pid = tl.program_id(0)
    t = (pid // (H + HKV)).to(tl.int64)
    j = pid % (H + HKV)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # The compiler types a name once across both branches (q and k may differ in dtype).
    if j < H:
        q_row = tl.load(q_ptr + t * stride_qt + j * D + cols, mask=mask, other=0.0)
        qy = _rms_norm_row(q_row.to(tl.float32), qw_ptr, cols, mask, D, eps)
        tl.store(qo_ptr + (t * H + j) * D + cols, qy, mask=mask)
    else:
        hk = j - H
        k_row = tl.load(k_ptr + t * stride_kt + hk * D + cols, mask=mask, other=0.0)
        ky = _rms_norm_row(k_row.to(tl.float32), kw_ptr, cols, mask, D, eps)
        tl.store(ko_ptr + (t * HKV + hk) * D + cols, ky, mask=mask)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,  # [R, N] f32/f16/bf16, row stride stride_x
    r_ptr,  # RESIDUAL: [R, N] the residual stream, row stride stride_r; else unused
    w_ptr,  # f32 [N]
    h_ptr,  # RESIDUAL: f32 [R, N] contiguous: residual + x; else unused
    y_ptr,  # WRITE_Y: f32 [R, N] contiguous: the normed rows; else unused
    qs_ptr,  # int8 [R, N] contiguous: the normed rows in q8_1
    ds_ptr,  # float32 [R, N / 32, 2] contiguous
    N,
    stride_x,
    stride_r,
    eps,
    BLOCK: tl.constexpr,
    RESIDUAL: tl.constexpr,  # add the residual first (add_rms_norm) and write h
    WRITE_Y: tl.constexpr,  # a consumer reads the float rows too
    PDL: tl.constexpr = False,
):
    """The norm_quant fusion: (add +) RMSNorm + weight + quantize to q8_1, one row a program.
    The float rows are the rms_norm / add_rms_norm kernels' to the bit (same _rms_norm_row),
    their q8_1 form the quantize kernel's (same _store_q8_1_row)."""
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = r + x  # reference: residual + x
        tl.store(h_ptr + row * N + cols, x, mask=mask)
    y = _rms_norm_row(x, w_ptr, cols, mask, N, eps)
    if WRITE_Y:
        tl.store(y_ptr + row * N + cols, y, mask=mask)
    _store_q8_1_row(y, qs_ptr + row * N, ds_ptr + row * (N // 16), N, BLOCK)

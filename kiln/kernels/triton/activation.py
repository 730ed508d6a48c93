"""SwiGLU: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, fp32 arithmetic (the formula of
torch's silu, which reference.swiglu uses).

Program (row, block) owns BLOCK columns of one token row. Only @triton.jit functions live here;
kiln/kernels/activation.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.pdl import wait_for_inputs
from kiln.kernels.triton.quantize import _store_q8_1_row


@triton.jit
def _silu_mul(g, u):
    """silu(g) * u in fp32, torch's formula: the one place both SwiGLU kernels compute it."""
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _swiglu_kernel(
    g_ptr,  # [T, F] f32/f16/bf16, row stride stride_g, unit stride along F
    u_ptr,  # [T, F] f32/f16/bf16, row stride stride_u
    out_ptr,  # f32 [T, F] contiguous
    F,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = _silu_mul(g, u)
    tl.store(out_ptr + row * F + cols, y, mask=mask)


@triton.jit
def _swiglu_quant_kernel(
    g_ptr,  # [T, F] f32/f16/bf16, row stride stride_g, unit stride along F (F a multiple of 32)
    u_ptr,  # [T, F] f32/f16/bf16, row stride stride_u
    out_ptr,  # WRITE_Y: f32 [T, F] contiguous; else unused
    qs_ptr,  # int8 [T, F] contiguous: the result in q8_1
    ds_ptr,  # float32 [T, F / 32, 2] contiguous
    F,
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,  # a multiple of 32: each program quantizes whole blocks of its own
    WRITE_Y: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The norm_quant fusion's SwiGLU: the _swiglu_kernel's values (same formula), then
    quantized to q8_1 as the quantize kernel does (same _store_q8_1_row), for the down mat-vec."""
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK
    cols = col0 + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = _silu_mul(g, u)
    if WRITE_Y:
        tl.store(out_ptr + row * F + cols, y, mask=mask)
    first = row * F + col0
    _store_q8_1_row(y, qs_ptr + first, ds_ptr + first // 16, F - col0, BLOCK)

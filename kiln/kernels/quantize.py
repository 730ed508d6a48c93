"""Launcher of the q8_1 quantization of activations (kernels/triton/quantize.py): a drop-in
replacement of kiln.quant.q8_1.quantize, bit for bit.

    quantize_q8_1(x: [M, K] f16/bf16/f32, unit stride along K; K a multiple of 32) -> Q8_1

One program per row, the row in registers (the RMSNorm kernels' size limit and warps).
"""

from __future__ import annotations

import torch

from kiln.kernels import next_power_of_2, pdl_launch
from kiln.kernels.norm import MAX_N, num_warps_for
from kiln.kernels.triton import quantize as _k
from kiln.quant.q8_1 import Q8_1, QK


def fits(k: int) -> bool:
    """Whether quantize_q8_1 takes rows of k values (whole blocks, at most MAX_N)."""
    return k % QK == 0 and k <= MAX_N


def quantize_q8_1(x: torch.Tensor, pdl: bool = False) -> Q8_1:
    """x: [M, K] -> its q8_1 form, as kiln.quant.q8_1.quantize."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [M, K] with unit stride along K"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"x is {x.dtype}"
    m, k = x.shape
    assert k % QK == 0, f"q8_1 rows are whole blocks of {QK} values; got K={k}"
    assert k <= MAX_N, f"quantize_q8_1: rows of {k} > {MAX_N} values do not fit this kernel"
    out = Q8_1.empty(m, k, x.device)
    if m == 0:
        return out
    block = next_power_of_2(k)
    _k._quantize_q8_1_kernel[(m,)](
        x, out.qs, out.ds, k, x.stride(0), BLOCK=block, num_warps=num_warps_for(block),
        **pdl_launch(pdl),
    )  # fmt: skip
    return out

"""Launcher of the SwiGLU kernel (kernels/triton/activation.py): a drop-in replacement of
kiln.ops.reference.swiglu.

    swiglu(gate: [T, F], up: [T, F]) -> f32 [T, F] = silu(gate) * up
    swiglu_quant(gate, up, write_y=True) -> (f32 [T, F] or None, the same in q8_1): norm_quant's

gate and up may be the column halves of a merged gate/up result (row stride 2F); one launch,
launch parameters from shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import torch

from kiln.kernels import cdiv, next_power_of_2, pdl_launch
from kiln.kernels.triton import activation as _k
from kiln.quant.q8_1 import Q8_1, QK

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Columns per program: 1024 fp32 over 4 warps is 8 values (two 16-byte loads) per thread; at
# F = 25600, T = 1 that is 25 programs. Untuned.
BLOCK = 1024
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._swiglu_kernel).__name__ == "InterpretedFunction"


def _check(x: torch.Tensor, what: str) -> None:
    assert x.dim() == 2, f"{what} must be [T, F]; got {tuple(x.shape)}"
    assert x.dtype in _X_DTYPES, f"{what} must be f16/bf16/f32; got {x.dtype}"
    assert x.stride(1) == 1 or x.shape[1] == 1, (
        f"{what} needs a contiguous last dim (any row stride); got strides {x.stride()}"
    )


def _launch_shape(gate: torch.Tensor, up: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """Checks gate and up; -> the grid and the BLOCK / num_warps of both SwiGLU kernels."""
    _check(gate, "swiglu gate")
    _check(up, "swiglu up")
    assert gate.shape == up.shape, f"gate {tuple(gate.shape)} vs up {tuple(up.shape)}"
    assert gate.device == up.device, f"gate on {gate.device}, up on {up.device}"
    t, f = gate.shape
    block = min(BLOCK, next_power_of_2(max(f, 1)))
    return (t, cdiv(f, block)), {"BLOCK": block, "num_warps": max(1, min(4, block // 256))}


def swiglu(gate: torch.Tensor, up: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """gate, up: [T, F] -> silu(gate) * up, f32 [T, F]."""
    grid, meta = _launch_shape(gate, up)
    t, f = gate.shape
    out = torch.empty((t, f), dtype=torch.float32, device=gate.device)
    if out.numel() == 0:
        return out
    _k._swiglu_kernel[grid](
        gate, up, out, f, gate.stride(0), up.stride(0), **meta, **pdl_launch(pdl)
    )  # fmt: skip
    return out


def swiglu_quant(
    gate: torch.Tensor, up: torch.Tensor, write_y: bool = True, pdl: bool = False
) -> tuple[torch.Tensor | None, Q8_1]:
    """silu(gate) * up (f32, None unless write_y) and its q8_1 form, one launch; F a multiple of
    32. Bit for bit the unfused form (swiglu_quant_unfused)."""
    grid, meta = _launch_shape(gate, up)
    t, f = gate.shape
    assert f % QK == 0, f"swiglu_quant: q8_1 rows are whole blocks of {QK} values; got F={f}"
    out = torch.empty((t, f), dtype=torch.float32, device=gate.device) if write_y else None
    q = Q8_1.empty(t, f, gate.device)
    if t == 0:
        return out, q
    _k._swiglu_quant_kernel[grid](
        gate,
        up,
        out if out is not None else q.ds,
        q.qs,
        q.ds,
        f,
        gate.stride(0),
        up.stride(0),
        WRITE_Y=write_y,
        **meta,
        **pdl_launch(pdl),
    )
    return out, q


def swiglu_quant_unfused(
    gate: torch.Tensor, up: torch.Tensor, write_y: bool = True, pdl: bool = False
) -> tuple[torch.Tensor | None, Q8_1]:
    """swiglu_quant's unfused form: the swiglu launch, then the quantize launch."""
    from kiln.kernels.quantize import quantize_q8_1

    y = swiglu(gate, up, pdl=pdl)
    return (y if write_y else None), quantize_q8_1(y, pdl=pdl)

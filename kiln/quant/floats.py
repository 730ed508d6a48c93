# F32:  1 value / 4 B (IEEE binary32, little-endian)
# F16:  1 value / 2 B (IEEE binary16, little-endian)
# BF16: 1 value / 2 B (bfloat16 = the high 16 bits of a binary32, little-endian)
"""Plain float formats, plus the f16 helpers every block format uses for its scales.

A "block" of these formats is one value, but the functions work on the whole [B, type_size]
tensor at once with dtype views, never per block.

NaN payloads are kept bit-exact like numpy (what `gguf.quants` uses) rather than like torch:
torch's f16 -> f32 conversion on CPU turns every NaN into 0x7fffffff and its f32 -> f16 turns
every NaN into 0x7e00, where numpy shifts the payload over. The fix costs one isnan + where.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.quant import register_format

__all__ = ["f16_to_f32", "f32_to_f16"]

_INT32_MIN = -(2**31)


def _maybe_any(mask: torch.Tensor) -> bool:
    # Skip the NaN fix-up when there is no NaN, but only check on CPU: on a GPU the check is a
    # host sync (and breaks CUDA-graph capture), so the fix-up always runs there.
    return mask.device.type != "cpu" or bool(mask.any())


def f16_to_f32(raw: torch.Tensor) -> torch.Tensor:
    """raw: uint8 [..., 2k] (little-endian f16) -> float32 [..., k], NaN payloads as numpy."""
    h = raw.contiguous().view(torch.float16)
    out = h.to(torch.float32)
    nan = torch.isnan(out)
    if _maybe_any(nan):
        # numpy: f32 bits = sign | 0x7f800000 | mantissa10 << 13 (no quieting).
        hb = h.view(torch.int16).to(torch.int32)
        sign = torch.where(hb < 0, _INT32_MIN, 0).to(torch.int32)
        bits = sign | 0x7F800000 | ((hb & 0x3FF) << 13)
        out = torch.where(nan, bits.view(torch.float32), out)
    return out


def f32_to_f16(x: torch.Tensor) -> torch.Tensor:
    """x: float32 [..., k] -> uint8 [..., 2k] (little-endian f16, round to nearest even).

    Finite values and infinities round like numpy's astype(float16); a NaN keeps the top 10 bits
    of its payload (or becomes 0x7c01 if they are zero) with its sign, as numpy does.
    """
    x = x.to(torch.float32).contiguous()
    h = x.to(torch.float16).view(torch.int16)
    nan = torch.isnan(x)
    if _maybe_any(nan):
        fb = x.view(torch.int32)
        payload = (fb & 0x7FFFFF) >> 13
        payload = torch.where(payload == 0, 1, payload)
        sign = torch.where(fb < 0, -0x8000, 0)  # 0x8000 as int16
        bits = (sign | 0x7C00 | payload).to(torch.int16)
        h = torch.where(nan, bits, h)
    return h.view(torch.uint8)


def _dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 4] -> float32 [B, 1]; a view of the input when it is contiguous.
    return blocks.contiguous().view(torch.float32)


def _quantize_f32(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 1] -> uint8 [B, 4]
    return values.to(torch.float32).contiguous().view(torch.uint8)


def _quantize_f16(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 1] -> uint8 [B, 2]
    return f32_to_f16(values)


def _dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: uint8 [B, 2] -> float32 [B, 1]: the 16 bits become the high half of a binary32,
    # by integer shift so every NaN payload survives on any device.
    bits = blocks.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


def _quantize_bf16(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 1] -> uint8 [B, 2]. Same as ggml_compute_fp32_to_bf16 and gguf's BF16:
    # NaN -> quiet NaN keeping the top payload bits, else round to nearest even on the bits.
    n = values.to(torch.float32).contiguous().view(torch.int32)
    hi = (n >> 16) & 0xFFFF
    lo = n & 0xFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    # Rounding carries from lo into hi; a NaN has lo = 0 here, so it never carries.
    rounded = hi + ((lo + 0x7FFF + (hi & 1)) >> 16)
    r = torch.where(nan, hi | 0x40, rounded) & 0xFFFF
    r = torch.where(r >= 0x8000, r - 0x10000, r)  # to the int16 range, then reinterpret
    return r.to(torch.int16).view(torch.uint8)


@register_format(GGMLQuantizationType.F32, quantize=_quantize_f32)
def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 4] -> float32 [B, 1] (aliases `blocks` when it is contiguous)."""
    return _dequantize_f32(blocks)


@register_format(GGMLQuantizationType.F16, quantize=_quantize_f16)
def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 2] -> float32 [B, 1]."""
    return f16_to_f32(blocks)


@register_format(GGMLQuantizationType.BF16, quantize=_quantize_bf16)
def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 2] -> float32 [B, 1]."""
    return _dequantize_bf16(blocks)

# MXFP4: 32 values / 17 B (e:u8 E8M0 exponent, qs:16 B of e2m1 nibbles; low nibbles are values
#        0..15, high nibbles are values 16..31; value = half(e) * kvalues[q], where
#        half(e) = 2**(e - 128) (ggml_e8m0_to_fp32_half; e < 2 gives a subnormal, e = 255 is 2**127,
#        never NaN) and kvalues are the e2m1 values doubled:
#        (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12))
"""MXFP4 (OCP microscaling fp4): dequantize and quantize, bit-exact against gguf.quants."""

from __future__ import annotations

from functools import cache

import torch
from gguf.constants import GGMLQuantizationType

from kiln.quant import register_format
from kiln.quant.legacy import lookup_nibbles

KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@cache
def _kvalues(device: torch.device) -> torch.Tensor:
    return torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=device)


def e8m0_to_f32_half(e: torch.Tensor) -> torch.Tensor:
    """e: integer [...] in 0..255 -> float32 [...] = 2**(e - 128), exactly as ggml builds it."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e.clamp(max=1), (e - 1) << 23)
    return bits.view(torch.float32)


def _quantize_mxfp4(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 17]
    n_blocks = values.shape[0]
    amax = values.abs().amax(dim=-1, keepdim=True)  # [B, 1]
    # gguf: floor(log2(amax)) - 2 + 127 in float32, cast to uint8. The float32 log2 of a value
    # just below a power of two rounds up to the integer, so the floor must see the float32-rounded
    # log2, not the exact one. A float64 log2 rounded to float32 floors like numpy's float32 log2
    # on all 2**31 positive floats (checked once on CPU and on an H100); float32 log2 did too on
    # both, but CUDA only promises it within 1 ulp.
    e = torch.floor(torch.log2(amax.double()).float()) + 125.0
    ok = (amax > 0) & torch.isfinite(e)
    # Cast like numpy on x86: through int32, low byte (subnormal amax gives e < 0 and wraps).
    e = torch.where(ok, e, 0.0).to(torch.int32) & 0xFF
    d = e8m0_to_f32_half(e)  # [B, 1]
    errs = (d.unsqueeze(-1) * _kvalues(values.device) - values.unsqueeze(-1)).abs()  # [B, 32, 16]
    best = errs.argmin(dim=-1).to(torch.int32)  # first of equal errors, as numpy
    qs = best[:, :16] | (best[:, 16:] << 4)
    return torch.cat([e, qs], dim=-1).to(torch.uint8).reshape(n_blocks, 17)


@register_format(GGMLQuantizationType.MXFP4, quantize=_quantize_mxfp4)
def dequantize_mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 17] -> float32 [B, 32]."""
    d = e8m0_to_f32_half(blocks[:, :1])  # [B, 1]
    return d * lookup_nibbles(blocks[:, 1:], KVALUES_MXFP4)

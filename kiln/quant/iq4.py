# IQ4_NL: 32 values / 18 B (d:f16, qs:16 B of nibbles; value = d * kvalues[q],
#         low nibbles are values 0..15, high nibbles are values 16..31)
# IQ4_XS: 256 values / 136 B (d:f16, scales_h:u16 LE, scales_l:4 B, qs:128 B), 8 sub-blocks of 32:
#         sub-block j: scale = (scales_l nibble j | ((scales_h >> 2j) & 3) << 4) - 32, where nibble
#         j is byte j // 2, low nibble first; its 16 B of qs hold values 0..15 in the low nibbles
#         and 16..31 in the high; value = (d * scale) * kvalues[q]
# kvalues = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""IQ4_NL and IQ4_XS: 4-bit non-linear grids. Dequantize only, bit-exact against gguf.quants."""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.quant import register_format
from kiln.quant.floats import f16_to_f32
from kiln.quant.legacy import lookup_nibbles

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@register_format(GGMLQuantizationType.IQ4_NL)
def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 18] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, :2])
    return d * lookup_nibbles(blocks[:, 2:], KVALUES_IQ4NL)


@register_format(GGMLQuantizationType.IQ4_XS)
def dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 136] -> float32 [B, 256]."""
    n_blocks = blocks.shape[0]
    d = f16_to_f32(blocks[:, :2])  # [B, 1]
    scales_h = blocks[:, 2:4].to(torch.int32)
    scales_h = scales_h[:, 0] | (scales_h[:, 1] << 8)  # [B]
    shifts = torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)
    high = (scales_h.unsqueeze(-1) >> shifts) & 0x03  # [B, 8]
    low = blocks[:, 4:8].to(torch.int32)
    low = torch.stack([low & 0x0F, low >> 4], dim=-1).reshape(n_blocks, 8)  # [B, 8]
    scale = ((low | (high << 4)) - 32).to(torch.float32)
    dl = (d * scale).unsqueeze(-1)  # [B, 8, 1], rounded to float32 first as gguf does
    q = lookup_nibbles(blocks[:, 8:].reshape(n_blocks, 8, 16), KVALUES_IQ4NL)  # [B, 8, 32]
    return (dl * q).reshape(n_blocks, 256)

# Q8_0: 32 values / 34 B (d:f16, qs:32 x int8; value = d * q)
# Q4_0: 32 values / 18 B (d:f16, qs:16 B of nibbles; value = d * (q - 8),
#       low nibbles are values 0..15, high nibbles are values 16..31)
# Q4_1: 32 values / 20 B (d:f16, m:f16, qs:16 B of nibbles as Q4_0; value = d * q + m)
# Q5_0: 32 values / 22 B (d:f16, qh:4 B, qs:16 B of nibbles as Q4_0; q = nibble | bit << 4 where
#       bit j of qh (byte j // 8, bit j % 8) belongs to value j; value = d * (q - 16))
# Q5_1: 32 values / 24 B (d:f16, m:f16, qh:4 B, qs:16 B, q as Q5_0; value = d * q + m)
"""The legacy (pre-k-quant) block formats: reference dequantize and quantize in plain torch.

Both directions are bit-exact against `gguf.quants` (numpy), which follows llama.cpp's reference
quantizers; the float32 operations below keep gguf's order of operations on purpose:
- The scale divisions (/ 15, / 31, / 127) divide by a tensor, not a Python number: torch on CUDA
  turns `x / scalar` into `x * (1 / scalar)`, which rounds differently.
- `id = 1 / d` is formed first (0 where d == 0) and values are multiplied by it, as gguf does.
- Q8_0 rounds half away from zero with gguf's np_roundf formula,
  floor(a) + floor(2 * (a - floor(a))); floor(a + 0.5) would give 1 for a = 0.5 - 2**-25.
  Q4_x / Q5_x use gguf's trunc(x * id + 8.5) and friends (ties go up, not away from zero).
- Float -> uint8 goes through int32 and keeps the low byte, as numpy does on x86: it only matters
  for degenerate blocks (NaN, inf, or a subnormal scale whose reciprocal overflows).
"""

from __future__ import annotations

from functools import cache

import torch
from gguf.constants import GGMLQuantizationType

from kiln.quant import register_format
from kiln.quant.floats import f16_to_f32, f32_to_f16

QK = 32  # values per block for all legacy formats


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs: uint8 [B, n] -> uint8 [B, 2n]: low nibbles first (values 0..n-1), then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q: integer [B, 2n] of 0..15 -> uint8 [B, n]; inverse of unpack_nibbles."""
    half = q.shape[-1] // 2
    return ((q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4)).to(torch.uint8)


@cache
def _nibble_table(kvalues: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """float32 [256, 2]: (kvalues[low nibble], kvalues[high nibble]) of every byte value."""
    kv = torch.tensor(kvalues, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([kv[b & 0x0F], kv[b >> 4]], dim=-1).to(device)


def lookup_nibbles(qs: torch.Tensor, kvalues: tuple[int, ...]) -> torch.Tensor:
    """qs: uint8 [..., n] -> float32 [..., 2n] = kvalues[nibble], low nibbles first (as
    unpack_nibbles); one table lookup per byte."""
    pairs = _nibble_table(kvalues, qs.device)[qs.long()]  # [..., n, 2]
    return pairs.transpose(-1, -2).reshape(*qs.shape[:-1], 2 * qs.shape[-1])


def _unpack_bits(qh: torch.Tensor) -> torch.Tensor:
    """qh: uint8 [B, n] -> uint8 [B, 8n] of 0/1; bit j is byte j // 8, bit j % 8 (little-endian)."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(*qh.shape[:-1], -1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bits: integer [B, 8n] of 0/1 -> uint8 [B, n]; inverse of _unpack_bits."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8) << shifts
    return b.sum(dim=-1).to(torch.uint8)


def _low_byte(y: torch.Tensor) -> torch.Tensor:
    """float32 of integral values -> int32 in 0..255, like numpy's astype(uint8 or int8) on x86:
    through int32, keeping the low byte; NaN, inf and values beyond int32 give 0."""
    ok = y.abs() < 2.0**31
    return torch.where(ok, y, 0.0).to(torch.int32) & 0xFF


def _recip(d: torch.Tensor) -> torch.Tensor:
    """gguf's `id = np.where(d == 0, 0, 1 / d)` in float32."""
    return torch.where(d == 0, 0.0, torch.reciprocal(d))


def _div(x: torch.Tensor, k: float) -> torch.Tensor:
    """x / k in float32, a true division on every device (see the module docstring)."""
    return x / torch.full_like(x, k)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """gguf's np_roundf: round half away from zero, with its exact float32 formula."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _absmax_signed(values: torch.Tensor) -> torch.Tensor:
    """values: [B, n] -> [B, 1]: the value of largest magnitude, sign kept (first one on ties)."""
    imax = values.abs().argmax(dim=-1, keepdim=True)
    return values.gather(-1, imax)


# ---- Q8_0 ----


def _quantize_q8_0(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 34]
    d = _div(values.abs().amax(dim=-1, keepdim=True), 127.0)
    q = _low_byte(_roundf(values * _recip(d)))
    return torch.cat([f32_to_f16(d), q.to(torch.uint8)], dim=-1)


@register_format(GGMLQuantizationType.Q8_0, quantize=_quantize_q8_0)
def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 34] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, :2])
    q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return q * d


# ---- Q4_0 ----


def _quantize_q4_0(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 18]
    d = _absmax_signed(values) / -8.0  # exact: a power of two
    q = _low_byte(torch.trunc(values * _recip(d) + 8.5)).clamp(max=15)
    return torch.cat([f32_to_f16(d), pack_nibbles(q)], dim=-1)


@register_format(GGMLQuantizationType.Q4_0, quantize=_quantize_q4_0)
def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 18] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, :2])
    q = unpack_nibbles(blocks[:, 2:]).to(torch.float32) - 8.0
    return d * q


# ---- Q4_1 ----


def _quantize_q4_1(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 20]
    vmax = values.amax(dim=-1, keepdim=True)
    vmin = values.amin(dim=-1, keepdim=True)
    d = _div(vmax - vmin, 15.0)
    q = _low_byte(torch.trunc((values - vmin) * _recip(d) + 0.5)).clamp(max=15)
    return torch.cat([f32_to_f16(d), f32_to_f16(vmin), pack_nibbles(q)], dim=-1)


@register_format(GGMLQuantizationType.Q4_1, quantize=_quantize_q4_1)
def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 20] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, 0:2])
    m = f16_to_f32(blocks[:, 2:4])
    q = unpack_nibbles(blocks[:, 4:]).to(torch.float32)
    return d * q + m  # two roundings, as gguf (no fused multiply-add)


# ---- Q5_0 ----


def _quantize_q5_0(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 22]
    d = _absmax_signed(values) / -16.0  # exact: a power of two
    q = _low_byte(torch.trunc(values * _recip(d) + 16.5)).clamp(max=31)
    return torch.cat([f32_to_f16(d), _pack_bits(q >> 4), pack_nibbles(q)], dim=-1)


@register_format(GGMLQuantizationType.Q5_0, quantize=_quantize_q5_0)
def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 22] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, :2])
    q = unpack_nibbles(blocks[:, 6:]) | (_unpack_bits(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.float32) - 16.0)


# ---- Q5_1 ----


def _quantize_q5_1(values: torch.Tensor) -> torch.Tensor:
    # values: float32 [B, 32] -> uint8 [B, 24]
    vmax = values.amax(dim=-1, keepdim=True)
    vmin = values.amin(dim=-1, keepdim=True)
    d = _div(vmax - vmin, 31.0)
    q = _low_byte(torch.trunc((values - vmin) * _recip(d) + 0.5)).clamp(max=31)
    return torch.cat([f32_to_f16(d), f32_to_f16(vmin), _pack_bits(q >> 4), pack_nibbles(q)], dim=-1)


@register_format(GGMLQuantizationType.Q5_1, quantize=_quantize_q5_1)
def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: uint8 [B, 24] -> float32 [B, 32]."""
    d = f16_to_f32(blocks[:, 0:2])
    m = f16_to_f32(blocks[:, 2:4])
    q = unpack_nibbles(blocks[:, 8:]) | (_unpack_bits(blocks[:, 4:8]) << 4)
    return d * q.to(torch.float32) + m

"""Quant format registry: one file per format (or family), each registering itself here.

A format works on rows of raw GGUF bytes. Shapes use torch order (the reverse of ggml's ne):
a quantized tensor of shape [*, n] is stored as uint8 [*, n // block_size * type_size].

    dequantize(raw: uint8 [..., row_bytes], qtype, n) -> float32 [..., n]
    quantize(x: float32 [..., n], qtype) -> uint8 [..., row_bytes]

Formats implement block functions on flattened blocks:
    dequantize_blocks(blocks: uint8 [B, type_size]) -> float32 [B, block_size]
    quantize_blocks(values: float32 [B, block_size]) -> uint8 [B, type_size]
Both are plain torch and run on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.errors import UnsupportedError

BlockFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QuantFormat:
    qtype: GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block
    dequantize_blocks: BlockFn
    quantize_blocks: BlockFn | None = None

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise UnsupportedError(
                f"{self.name} needs rows that are a multiple of {self.block_size} values; got {n}"
            )
        return n // self.block_size * self.type_size


FORMATS: dict[GGMLQuantizationType, QuantFormat] = {}


def register_format(qtype: GGMLQuantizationType, *, quantize: BlockFn | None = None):
    """Decorator for a dequantize_blocks function; `quantize` is the matching quantize_blocks."""

    def wrap(dequantize_blocks: BlockFn) -> BlockFn:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        FORMATS[qtype] = QuantFormat(qtype, block_size, type_size, dequantize_blocks, quantize)
        return dequantize_blocks

    return wrap


def get_format(qtype: GGMLQuantizationType | int | str) -> QuantFormat:
    """Look a format up by enum, integer id or name (case-insensitive)."""
    try:
        if isinstance(qtype, str):
            qtype = GGMLQuantizationType[qtype.upper()]
        else:
            qtype = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedError(f"unknown tensor type {qtype!r}") from None
    fmt = FORMATS.get(qtype)
    if fmt is None:
        known = ", ".join(sorted(f.name for f in FORMATS.values()))
        raise UnsupportedError(
            f"tensor type {qtype.name} is not supported by Kiln (known: {known})"
        )
    return fmt


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType | int | str, n: int) -> torch.Tensor:
    """raw: uint8 [..., row_bytes] -> float32 [..., n] on raw's device."""
    fmt = get_format(qtype)
    row_bytes = fmt.row_bytes(n)
    if raw.dtype != torch.uint8:
        raw = raw.contiguous().view(torch.uint8)
    lead = raw.shape[:-1] if raw.shape[-1] == row_bytes else None
    if lead is None:
        if raw.numel() % row_bytes:
            raise UnsupportedError(f"{raw.numel()} bytes is not a whole number of {fmt.name} rows")
        lead = (raw.numel() // row_bytes,)
    blocks = raw.reshape(-1, fmt.type_size)
    out = fmt.dequantize_blocks(blocks)
    return out.reshape(*lead, n)


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType | int | str) -> torch.Tensor:
    """x: float [..., n] -> uint8 [..., row_bytes] on x's device."""
    fmt = get_format(qtype)
    if fmt.quantize_blocks is None:
        raise UnsupportedError(f"Kiln cannot quantize to {fmt.name} (it can only read it)")
    n = x.shape[-1]
    row_bytes = fmt.row_bytes(n)
    blocks = x.to(torch.float32).reshape(-1, fmt.block_size)
    out = fmt.quantize_blocks(blocks)
    return out.reshape(*x.shape[:-1], row_bytes)


def _load_formats() -> None:
    # Importing a format module registers it.
    from kiln.quant import floats, iq4, k_quants, legacy, mxfp4  # noqa: F401


_load_formats()

"""A raw tensor whose bytes are made when asked for, so that a model can be written to disk
one tensor at a time without ever existing whole in memory (an 8B Q4_K_M model is ~5 GB).

LazyRawTensor has RawTensor's interface (name, qtype, shape, data, n_elements, nbytes,
dequantize); `data` runs the maker on every access and is not cached. Shapes and sizes are known
without running it, so ModelConfig checks and the GGUF header cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.gguf.model import TensorMethods


def raw_row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n values stored as qtype."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n % block_size:
        raise ValueError(f"{qtype.name} rows must be a multiple of {block_size} values, got {n}")
    return n // block_size * type_size


def raw_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a whole tensor of torch-order shape stored as qtype."""
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    return n_rows * raw_row_bytes(qtype, shape[-1])


@dataclass(frozen=True, slots=True)
class LazyRawTensor(TensorMethods):
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, as RawTensor
    make: Callable[[], torch.Tensor]  # -> uint8 [*shape[:-1], row_bytes]

    @property
    def data(self) -> torch.Tensor:
        return self.make()

    @property
    def nbytes(self) -> int:
        return raw_nbytes(self.qtype, self.shape)

"""The in-memory view of a GGUF model: metadata plus raw (still quantized) tensors.

The reader fills it from a memory-mapped file; kiln.gguf.synthetic fills it directly, on any
device, without a file. Everything downstream (config, models, info) takes a GGUFModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf.constants import GGMLQuantizationType, GGUFValueType

from kiln import quant


class TensorMethods:
    """What RawTensor and LazyRawTensor (kiln.gguf.lazy) derive from qtype, shape and data."""

    __slots__ = ()
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dequantize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 [*shape]."""
        data = self.data if device is None else self.data.to(device)
        return quant.dequantize(data, self.qtype, self.shape[-1]).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class RawTensor(TensorMethods):
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: the reverse of ggml's ne, e.g. [n_out, n_in]
    data: torch.Tensor  # uint8 [*shape[:-1], row_bytes]: the GGUF blocks, a view of the mmap

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(slots=True)
class GGUFModel:
    metadata: dict[str, Any]
    tensors: dict[str, RawTensor]
    # key -> [value type, element type for arrays]; lets a writer keep the exact types that
    # llama.cpp checks (it rejects e.g. an int32 where it expects uint32). Keys absent here are
    # typed from their Python value by the writer.
    metadata_types: dict[str, list[GGUFValueType]] = field(default_factory=dict)
    path: Path | None = None  # None for a model built in memory
    version: int | None = None
    file_size: int | None = None
    _config: Any = field(default=None, repr=False)

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory model>"

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def config(self):
        """The validated ModelConfig (computed once)."""
        if self._config is None:
            from kiln.config import ModelConfig

            self._config = ModelConfig.from_gguf(self)
        return self._config

"""Weight: a GGUF tensor on the compute device, still in its quantized format.

Ops take Weights, not float tensors, so a kernel can read the blocks directly. The reference
path dequantizes; with keep_dense=True (the CPU default) it keeps the float32 copy, trading
memory (4 bytes per parameter) for not dequantizing every weight on every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.gguf.model import RawTensor


@dataclass(slots=True, eq=False)
class Weight:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, e.g. [n_out, n_in] or [n_expert, n_out, n_in]
    raw: torch.Tensor  # uint8 [*shape[:-1], row_bytes]
    keep_dense: bool = False
    _dense: torch.Tensor | None = None

    @classmethod
    def from_raw(cls, t: RawTensor, device: torch.device, keep_dense: bool) -> Weight:
        return cls(t.name, t.qtype, tuple(t.shape), t.data.to(device), keep_dense)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def dense(self) -> torch.Tensor:
        """float32 [*shape], bit-exact with gguf's dequantization."""
        if self._dense is not None:
            return self._dense
        out = quant.dequantize(self.raw, self.qtype, self.shape[-1]).reshape(self.shape)
        if self.keep_dense:
            self._dense = out
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), shape[-1]]: the selected rows only (embedding lookups)."""
        if self._dense is not None:
            return self._dense[index]
        return quant.dequantize(self.raw[index], self.qtype, self.shape[-1])

    def expert(self, e: int) -> torch.Tensor:
        """float32 [*shape[1:]] of one expert of a stacked [n_expert, n_out, n_in] weight."""
        if self._dense is not None:
            return self._dense[e]
        return quant.dequantize(self.raw[e], self.qtype, self.shape[-1])


def concat_rows(name: str, parts: list[Weight]) -> Weight | None:
    """One weight whose output rows are the parts' rows in order (the merged_qkv and
    merged_gate_up fusions), or None when the parts cannot be merged (different types or input
    sizes: e.g. llama.cpp's Q4_K_M keeps some attn_v in Q6_K). Stacked expert weights
    [n_expert, N, K] are merged along N; vectors (biases) are concatenated."""
    first = parts[0]

    def _key(w: Weight) -> tuple:
        return (w.qtype, len(w.shape), w.shape[:-2] + w.shape[-1:] if len(w.shape) > 1 else ())

    if any(_key(p) != _key(first) for p in parts):
        return None
    dim = -2 if len(first.shape) > 1 else 0
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    raw = torch.cat([p.raw for p in parts], dim=dim)
    merged = Weight(name, first.qtype, tuple(shape), raw, first.keep_dense)
    if all(p._dense is not None for p in parts):
        merged._dense = torch.cat([p._dense for p in parts], dim=dim)
    return merged

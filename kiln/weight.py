"""Weight: a GGUF tensor on the compute device, still in its quantized format.

Ops take Weights, not float tensors, so a kernel can read the blocks directly. The reference
path dequantizes; with keep_dense=True (the torch backend's CPU default) it keeps the float32
copy, trading memory (4 bytes per parameter) for not dequantizing every weight on every token.

A backend may attach its own form of the weight made at load (`packed`: the cpu backend's
int4-packed planes, kiln/ops/cpu_pack.py); the blocks stay the reference (dense() still
dequantizes them bit-exactly). A weight merged from parts whose forms are packed keeps no copy
of the parts' blocks (`raw` None, `parts` set): dense() and expert() read the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.gguf.model import RawTensor


@dataclass(slots=True, eq=False)
class Weight:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, e.g. [n_out, n_in] or [n_expert, n_out, n_in]
    raw: torch.Tensor | None  # uint8 [*shape[:-1], row_bytes]; None: the blocks are `parts`'
    keep_dense: bool = False
    _dense: torch.Tensor | None = None
    packed: Any = None  # a backend's own form of the weight, made at load (or None)
    parts: tuple[Weight, ...] = ()  # a merged weight whose blocks stay in its parts

    @classmethod
    def from_raw(cls, t: RawTensor, device: torch.device, keep_dense: bool) -> Weight:
        return cls(t.name, t.qtype, tuple(t.shape), t.data.to(device), keep_dense)

    @property
    def device(self) -> torch.device:
        return self.raw.device if self.raw is not None else self.parts[0].device

    def dense(self) -> torch.Tensor:
        """float32 [*shape], bit-exact with gguf's dequantization."""
        if self._dense is not None:
            return self._dense
        if self.raw is None:
            out = torch.cat([p.dense() for p in self.parts], dim=_merge_dim(self.shape))
        else:
            out = quant.dequantize(self.raw, self.qtype, self.shape[-1]).reshape(self.shape)
        if self.keep_dense:
            self._dense = out
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), shape[-1]]: the selected rows only (embedding lookups)."""
        if self._dense is not None:
            return self._dense[index]
        if self.raw is None:
            return self.dense()[index]
        return quant.dequantize(self.raw[index], self.qtype, self.shape[-1])

    def expert(self, e: int) -> torch.Tensor:
        """float32 [*shape[1:]] of one expert of a stacked [n_expert, n_out, n_in] weight."""
        if self._dense is not None:
            return self._dense[e]
        if self.raw is None:
            return torch.cat([p.expert(e) for p in self.parts], dim=-2)
        return quant.dequantize(self.raw[e], self.qtype, self.shape[-1])


def _merge_dim(shape: tuple[int, ...]) -> int:
    return -2 if len(shape) > 1 else 0


def concat_rows(name: str, parts: list[Weight]) -> Weight | None:
    """One weight whose output rows are the parts' rows in order (the merged_qkv and
    merged_gate_up fusions), or None when the parts cannot be merged (different types or input
    sizes: e.g. llama.cpp's Q4_K_M keeps some attn_v in Q6_K). Stacked expert weights
    [n_expert, N, K] are merged along N; vectors (biases) are concatenated.

    Parts that carry a backend's packed form are merged without copying their blocks: the
    merged weight's packed form is the forms' concatenation (`packed.concat`; the parts give
    theirs up, so memory holds one), and its blocks are read from the parts when the reference
    asks for them."""
    first = parts[0]

    def _key(w: Weight) -> tuple:
        return (w.qtype, len(w.shape), w.shape[:-2] + w.shape[-1:] if len(w.shape) > 1 else ())

    if any(_key(p) != _key(first) for p in parts):
        return None
    dim = _merge_dim(first.shape)
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    if all(p.packed is not None for p in parts):
        merged = Weight(name, first.qtype, tuple(shape), None, first.keep_dense, parts=tuple(parts))
        merged.packed = first.packed.concat([p.packed for p in parts])
        for p in parts:
            p.packed = None
        return merged
    raw = torch.cat([p.raw for p in parts], dim=dim)
    merged = Weight(name, first.qtype, tuple(shape), raw, first.keep_dense)
    if all(p._dense is not None for p in parts):
        merged._dense = torch.cat([p._dense for p in parts], dim=dim)
    return merged

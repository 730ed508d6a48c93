"""KV-cache element types, llama.cpp's --cache-type-k / --cache-type-v: how one layer's K or V
rows are stored, written and read back. `KVCacheType` is the one place that decides it (the
tensors of a pool, bytes per token for the memory checks and the bench floor, the write, the
read); the runtime's pool allocates through it, the ops write through `write_rows` and read a
pool's rows back with `.float()`.

The block types quantize each row of D values as it is written, in blocks of 32 along the head
dimension, with ggml's reference quantizers (kiln/quant/legacy.py: quantize_row_q8_0_ref and
quantize_row_q4_0_ref, bit-exact against the gguf package), and dequantize the rows attention
reads to float32. Every backend that accepts a block type writes the same bytes.

One layer's pool of S rows: f32 / f16 / bf16, a float tensor [S, Hkv, D] of that dtype; q8_0,
uint8 [S, Hkv, D / 32 * 34] (D / 32 Q8_0 blocks a head); q4_0, uint8 [S, Hkv, D / 32 * 18].
A head's row holds its blocks' bytes split (`to_split`): the D / 32 f16 scales first, then the
blocks' quants (32 bytes a block for q8_0, 16 for q4_0) in block order, so the quants of a row
are contiguous and as aligned as the row (a GGML block of 34 or 18 bytes puts them at 2 mod 4):
the attention kernels read them in 8- and 16-byte loads. The bytes are ggml's, moved.

Rotation, as llama.cpp does since its PR 21038 (April 2026): a block-type pool of a head size
that is a multiple of ROT (64) stores each row rotated by the orthonormal Hadamard matrix of
ROT x ROT (Sylvester's, scaled by 1 / sqrt(ROT); symmetric, its own inverse), applied to each
ROT values of the row (`rotate`). Rotation spreads a few outlier channels over the block, so
its quantization loses less (demo model, -ctk/-ctv q4_0, wiki.test.raw: llama.cpp's perplexity
30.16 with it, 33.56 without). qkv_norm_rope returns q rotated like K (`rotated_like`; scores
unchanged: H is orthonormal), in the same launch on the GPU, and the attention op rotates its
output back where V is rotated (`rotated_like` again: H is its own inverse; on the GPU in the
decode combine and the flash kernel's epilogue). `LLAMA_ATTN_ROT_DISABLE=1` turns it off, as it
does llama.cpp's (`rotation` is the one decision).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from gguf.constants import GGMLQuantizationType

from kiln.errors import UsageError
from kiln.quant import dequantize, get_format, quantize


@dataclass(frozen=True)
class KVCacheType:
    """One KV-cache element type: a float dtype, or a GGML block type (qtype)."""

    name: str
    dtype: torch.dtype | None = None
    qtype: GGMLQuantizationType | None = None

    @property
    def quantized(self) -> bool:
        return self.qtype is not None

    @property
    def block_size(self) -> int:
        """Values per block along a row (1 for the float types)."""
        return get_format(self.qtype).block_size if self.quantized else 1

    def row_bytes(self, dim: int) -> int:
        """Bytes of one head's row of `dim` values."""
        if self.quantized:
            fmt = get_format(self.qtype)
            return dim // fmt.block_size * fmt.type_size
        return dim * torch.empty((), dtype=self.dtype).element_size()

    def check_head_dim(self, dim: int, which: str) -> None:
        """UsageError when rows of `dim` values cannot be stored in this type (`which`: "K" or
        "V", for the message)."""
        if dim % self.block_size:
            fits = [t.name for t in CACHE_TYPES.values() if dim % t.block_size == 0]
            raise UsageError(
                f"a {self.name} {which} cache stores blocks of {self.block_size} values along "
                f"the head, and this model's {which} head size is {dim}: use a {which} cache type "
                f"of {', '.join(fits)} (--cache-type-{which.lower()}, cache_type_{which.lower()}=)"
            )

    def allocate(
        self, rows: int, heads: int, dim: int, device: torch.device
    ) -> torch.Tensor | QuantizedRows:
        """A zeroed pool of `rows` rows of `heads` heads of `dim` values."""
        if not self.quantized:
            return torch.zeros((rows, heads, dim), device=device, dtype=self.dtype)
        data = torch.zeros((rows, heads, self.row_bytes(dim)), device=device, dtype=torch.uint8)
        rotated = rotation(self, dim)
        if rotated:
            hadamard(data.device)  # made before any CUDA-graph capture reads it (x.device's key)
        return QuantizedRows(data, self, dim, rotated)


ROT = 64  # values a rotation mixes: llama.cpp's n_rot of the KV cache


def rotation(kind: KVCacheType, dim: int) -> bool:
    """Whether rows of `dim` values in this cache type are stored rotated (see the top): a block
    type, dim a multiple of ROT, LLAMA_ATTN_ROT_DISABLE not 1."""
    off = os.environ.get("LLAMA_ATTN_ROT_DISABLE", "0").strip() == "1"
    return kind.quantized and dim % ROT == 0 and not off


@functools.cache
def hadamard(device: torch.device) -> torch.Tensor:
    """float32 [ROT, ROT]: Sylvester's Hadamard matrix / sqrt(ROT), H[i, j] = (-1)^popcount(i & j)
    / 8: orthonormal, symmetric, its own inverse."""
    i = torch.arange(ROT)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    for b in range(ROT.bit_length()):
        parity ^= (bits >> b) & 1
    return ((1 - 2 * parity).float() / ROT**0.5).to(device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x float [..., D] (D a multiple of ROT) with each ROT values multiplied by the Hadamard
    matrix, in float32: the rotation and its inverse alike."""
    h = hadamard(x.device)
    shape = x.shape
    return (x.float().reshape(*shape[:-1], shape[-1] // ROT, ROT) @ h).reshape(shape)


def rotated_like(x: torch.Tensor, pool) -> torch.Tensor:
    """x rotated (float32) where the pool stores its rows rotated, else x as is: the query that
    reads a rotated K (q . k is unchanged by the same orthonormal rotation of both), and the
    attention output over a rotated V rotated back."""
    return rotate(x) if getattr(pool, "rotated", False) else x


CACHE_TYPES: dict[str, KVCacheType] = {
    t.name: t
    for t in (
        KVCacheType("f32", dtype=torch.float32),
        KVCacheType("f16", dtype=torch.float16),
        KVCacheType("bf16", dtype=torch.bfloat16),
        KVCacheType("q8_0", qtype=GGMLQuantizationType.Q8_0),
        KVCacheType("q4_0", qtype=GGMLQuantizationType.Q4_0),
    )
}
_BY_DTYPE = {t.dtype: t for t in CACHE_TYPES.values() if t.dtype is not None}


def cache_type(value: str | torch.dtype | KVCacheType, what: str = "cache type") -> KVCacheType:
    """A KVCacheType from its name (case-insensitive), a float dtype or itself; UsageError
    naming the valid types otherwise (`what`: the option, for the message)."""
    if isinstance(value, KVCacheType):
        return value
    if isinstance(value, torch.dtype) and value in _BY_DTYPE:
        return _BY_DTYPE[value]
    if isinstance(value, str) and value.lower() in CACHE_TYPES:
        return CACHE_TYPES[value.lower()]
    raise UsageError(f"unknown {what} {value!r}: use one of {', '.join(CACHE_TYPES)}")


class QuantizedRows:
    """A layer's K or V pool in a block type, with the row protocol the ops use on a float pool
    tensor: `pool[rows]` and `pool.index_select(0, rows)` select rows (still quantized),
    `.float()` dequantizes them to float32 [..., Hkv, D], `pool[rows] = other` copies rows (the
    pool's growth and copy-on-write). Writes go through `write_rows`."""

    __slots__ = ("data", "type", "dim", "rotated")

    def __init__(self, data: torch.Tensor, type: KVCacheType, dim: int, rotated: bool = False):
        self.data, self.type, self.dim = data, type, dim  # data: uint8 [..., Hkv, row_bytes]
        self.rotated = rotated  # rows stored rotated (see the top): write rotates, float() not

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.dim))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype  # the storage's (uint8): never float32, so readers call float()

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, rows) -> QuantizedRows:
        return QuantizedRows(self.data[rows], self.type, self.dim, self.rotated)

    def __setitem__(self, rows, other: QuantizedRows) -> None:
        assert (other.type, other.dim, other.rotated) == (self.type, self.dim, self.rotated), (
            "rows of another cache type"
        )
        self.data[rows] = other.data

    def index_select(self, dim: int, rows: torch.Tensor) -> QuantizedRows:
        assert dim == 0, "a KV pool selects rows only"
        return QuantizedRows(self.data.index_select(0, rows), self.type, self.dim, self.rotated)

    def float(self) -> torch.Tensor:
        """The rows' values as stored (rotated where `rotated`), float32 [..., Hkv, D]."""
        return dequantize(from_split(self.data, self.type), self.type.qtype, self.dim)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x: float [T, Hkv, D] (rotated first where `rotated`) quantized into rows `slots`
        (int64 [T])."""
        blocks = quantize(rotate(x) if self.rotated else x, self.type.qtype)
        self.data.index_copy_(0, slots, to_split(blocks, self.type))


SCALE_BYTES = 2  # the f16 scale that opens a q8_0 / q4_0 block


def to_split(blocks: torch.Tensor, kind: KVCacheType) -> torch.Tensor:
    """uint8 [..., NB * block bytes] GGML blocks -> the pool's row layout (see the top): the NB
    scales, then the NB blocks' quants."""
    b = blocks.reshape(*blocks.shape[:-1], -1, get_format(kind.qtype).type_size)
    scales, quants = b[..., :SCALE_BYTES], b[..., SCALE_BYTES:]
    return torch.cat((scales.flatten(-2), quants.flatten(-2)), dim=-1)


def from_split(data: torch.Tensor, kind: KVCacheType) -> torch.Tensor:
    """The pool's row layout -> uint8 GGML blocks [..., NB * block bytes] (to_split undone)."""
    size = get_format(kind.qtype).type_size
    nb = data.shape[-1] // size
    scales = data[..., : nb * SCALE_BYTES].reshape(*data.shape[:-1], nb, SCALE_BYTES)
    quants = data[..., nb * SCALE_BYTES :].reshape(*data.shape[:-1], nb, size - SCALE_BYTES)
    return torch.cat((scales, quants), dim=-1).flatten(-2)


def write_rows(cache: torch.Tensor | QuantizedRows, slots: torch.Tensor, x: torch.Tensor) -> None:
    """x: [T, Hkv, D] written into the pool rows `slots` (int64 [T], distinct) in the pool's
    type: converted to a float pool's dtype, quantized into a block pool. No host sync."""
    if isinstance(cache, QuantizedRows):
        cache.write(slots, x)
    else:
        cache.index_copy_(0, slots, x if x.dtype == cache.dtype else x.to(cache.dtype))

# q8_1 activations: 32 values a block; qs: int8 [M, K] (the quants, row-major, unit stride),
#   ds: float32 [M, K // 32, 2] (per block d = amax / 127 and s = d * sum(q)); value = d * q.
"""The q8_1 activation format: what the norm_quant fusion writes and the int8 mat-vecs read.

llama.cpp's block_q8_1 is 32 int8 quants with an f16 scale d and an f16 s = d * sum(q) in one
36-byte struct. Kiln keeps the same values in two tensors of their own: the quants contiguous
(a mat-vec lane loads 4 or 8 of them as one word, aligned, beside the weight's own lanes) and
d, s side by side in float32 (one 8-byte load per block). float32 instead of f16 costs 4 more
bytes a block of 32 (a 4096-wide row: 512 B more) and drops two roundings llama.cpp has. s is
llama.cpp's whole-block sum for the formats with an offset (Q4_1, Q5_1, Q4_K's mins: m * sum(x)
= m * s); Kiln's mat-vec lanes hold a part of a block each, so they sum their own x quants
instead (shared by a program's weight rows) and do not read it.

Quantization, as llama.cpp's CUDA quantize_q8_1: d = amax / 127 and q = roundf(x / d) (round half
away from zero; q = 0 where amax = 0), both divisions correctly rounded, so the kernel
(kiln/kernels/triton/quantize.py) gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32  # values per block


@dataclass(frozen=True)
class Q8_1:
    """A batch of activation rows in q8_1: qs int8 [M, K], ds float32 [M, K // 32, 2]."""

    qs: torch.Tensor
    ds: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qs.shape)

    @staticmethod
    def empty(m: int, k: int, device: torch.device) -> Q8_1:
        """Uninitialized rows of K values, in buffers of their own."""
        return Q8_1(
            torch.empty((m, k), dtype=torch.int8, device=device),
            torch.empty((m, k // QK, 2), dtype=torch.float32, device=device),
        )

    def check(self) -> None:
        m, k = self.qs.shape
        assert self.qs.dtype == torch.int8 and self.qs.is_contiguous(), (
            f"q8_1 quants must be a contiguous int8 [M, K]; got {self.qs.dtype} {self.qs.stride()}"
        )
        assert k % QK == 0, f"q8_1 rows are whole blocks of {QK} values; got K={k}"
        assert self.ds.shape == (m, k // QK, 2) and self.ds.dtype == torch.float32, (
            f"q8_1 scales must be float32 [{m}, {k // QK}, 2]; got {self.ds.dtype} {self.ds.shape}"
        )
        assert self.ds.is_contiguous() and self.ds.device == self.qs.device


@dataclass(frozen=True)
class Activation:
    """A norm's or SwiGLU's rows as their consumers read them (the norm_quant fusion): q8_1 for
    the int8 mat-vecs, float32 where some consumer reads floats (None where none does)."""

    f32: torch.Tensor | None  # [M, K]
    q8: Q8_1

    @property
    def rows(self) -> int:
        return self.q8.qs.shape[0]

    @staticmethod
    def floats(x: torch.Tensor | Activation, reader: str) -> torch.Tensor:
        """The float rows a consumer (`reader`, for the message) reads from x: x itself, or an
        Activation's f32, which norm_quant writes wherever a consumer reads floats."""
        if not isinstance(x, Activation):
            return x
        assert x.f32 is not None, f"{reader} reads floats, which norm_quant did not write"
        return x.f32


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf in float32: trunc(v) + trunc(2 * (v - trunc(v))), exact (v - trunc(v) and the
    doubling are exact), where floor(|v| + 0.5) would round 0.5 - 2**-25 up."""
    t = torch.trunc(v)
    return t + torch.trunc(2 * (v - t))


def quantize(x: torch.Tensor) -> Q8_1:
    """x: float [M, K] (K a multiple of 32) -> its q8_1 form."""
    assert x.dim() == 2 and x.shape[1] % QK == 0, (
        f"quantize to q8_1 needs [M, K] with K a multiple of {QK}; got {tuple(x.shape)}"
    )
    m, k = x.shape
    blocks = x.float().reshape(m, k // QK, QK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = amax / torch.tensor(127.0, device=x.device)
    q = torch.where(amax > 0, round_half_away(blocks / d), 0.0)
    s = d.squeeze(-1) * q.sum(dim=-1)
    ds = torch.stack([d.squeeze(-1), s], dim=-1).contiguous()
    return Q8_1(q.to(torch.int8).reshape(m, k).contiguous(), ds)


def dequantize(a: Q8_1) -> torch.Tensor:
    """-> float32 [M, K] = d * q."""
    m, k = a.qs.shape
    q = a.qs.float().reshape(m, k // QK, QK)
    return (q * a.ds[..., :1]).reshape(m, k)

"""The cpu backend's forms of a weight, made once at load (kiln/ops/cpu.py `pack_for_kernel`).

No float32 copy of a quantized weight is kept. Each 2-D weight gets one of these forms:

- `Int4Planes` (Q4_0, Q4_1, Q4_K: one plane; Q5_0, Q5_1, Q5_K, Q8_0: two planes): torch's CPU
  int4 mat-mul (`torch._weight_int4pack_mm_for_cpu`), whose weight is (v - 8) * scale + zero for
  4-bit v and one (scale, zero) per group of 32 values along K, in bfloat16. Every format above
  is w = s * q + z per 32 values with an integer q (`_AFFINE`); q in [-8, 7] is one plane
  (v = q + 8, scale s, zero z); q in [-128, 127] is two: q = 16 h + l with h = q >> 4 in [-8, 7]
  and l = q & 15, plane H (v = h + 8, scale 16 s, zero 0) plus plane L (v = l, scale s, zero
  8 s + z). So Q4_0 and Q8_0 keep their exact values up to the rounding of d to bfloat16
  (zeros 0 and 8 s are exact), Q4_1 / Q4_K / Q5_1 / Q5_K also round the zero. Bytes per value:
  0.625 a plane (Q4_1's own size; Q8_0: 1.25 against its 1.0625).
  Packed layout (torch 2.13's; B = 64 rows a block where its kernel runs AVX-512, 32 on AVX2,
  found once per process by matching torch's own converter: `int4_block`): uint8 [N / B, K,
  B / 2], byte (b, k, j) = v[B b + j, k] | v[B b + B / 2 + j, k] << 4; scale_zeros bfloat16
  [K / 32, N, 2]. N is padded to a multiple of 64 (scale = zero = 0: the padded rows are
  zeros, sliced off). Activations go in as bfloat16 and results come out in bfloat16 (the CPU
  kernel's float32 path is a slow fallback: 11 ms against 26 us for a 1536 x 576 mat-vec);
  results are widened to float32 at once. All planes of a model come from one allocation
  (`Arena`); weights a model merges are packed side by side (`pack_group`), so the merged
  weight is their form as it is.
- `Int8Blocks`: the output projection in Q8_0 with a vocabulary's rows (its int8 values by
  block of 32, `torch._weight_int8pack_mm` per block): 1.06 bytes a value instead of 1.25.
- The output projection (either form) keeps its exact scales: each row's largest outputs are
  recomputed in float32 (`_refine`), and a tied embedding reads its rows there.
- `Dense`: F32 and BF16 weights, a view of the GGUF bytes themselves (no copy).
- `Dequant`: every other format (F16, Q2_K, Q3_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4) and weights of
  shapes int4pack refuses: dequantized per call in chunks of rows, float32 matmul.
- `Concat`: the forms of a merged weight that cannot be joined into one (outputs concatenated).

The choice per format, measured (2-core AMD EPYC Zen 4, AVX-512 BF16, no AMX; torch 2.13; one
thread, CPU time, demo-model shapes): a 1536 x 576 mat-vec (M = 1) takes 26-49 us in int4pack
against 70 us in float32 and 86 us in bfloat16 from a dense copy; per-channel int8
(`_weight_int8pack_mm`) is as fast but has one scale per row, and splitting Q8_0's blocks over
18 int8 calls (one per block of 32) costs 235 us; two int4 planes for the 49152 x 576 Q8_0
output projection take 2 x 1.6 ms against 4.1 ms for int8 per channel. For prompts (M = 512)
int4pack is about 2x slower than a bfloat16 GEMM on a dense copy (11 ms against 5 ms) but
dequantizing that copy per call costs about as much again (1.6-4.6 ms), so int4pack serves
every M. On AVX2 (no AVX-512) the same int4 kernel unpacks in software and runs at about 5 GB/s
(3072 x 576, one row: 163 us), a third of the rate above, with no faster torch kernel for 4-bit
weights (docs/performance.md, session 10).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as Q

from kiln import quant
from kiln.quant.k_quants import _scale_min_k4
from kiln.weight import Weight

GROUP = 32  # values per (scale, zero) group of the int4 planes
REFINE_TOP = 32  # outputs of the output projection recomputed exactly per row
REFINE_VALUES = 1 << 20  # exact weight values made per pass of that (4 MB)
ROW_ALIGN = 64  # rows a weight is padded to: a multiple of every int4_block()
PACK_VALUES = 1 << 20  # values packed per chunk at load: bounds the temporaries (a few MB)
DEQUANT_VALUES = 1 << 20  # values dequantized per chunk by Dequant (4 MB of float32)


def as_int8_blocks(w: Weight, exact: bool) -> bool:
    """Whether pack(w, exact=exact) makes Int8Blocks: the output projection in Q8_0 with a
    vocabulary's rows."""
    return (
        exact
        and w.qtype == Q.Q8_0
        and w.shape[0] >= INT8_MIN_ROWS
        and hasattr(torch, "_weight_int8pack_mm")
    )


def int4pack_available() -> bool:
    return hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and hasattr(
        torch, "_weight_int4pack_mm_for_cpu"
    )


# ---------------------------------------------------------------------------------------------
# formats as w = s * (u - offset) + z per group of 32: u uint8 [B, block], s and z float32
# [B, block / 32]


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """raw: uint8 [B, 2] -> float32 [B, 1]."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """qs: uint8 [B, n] whose every `width` bytes hold 2 * width values, low nibbles first (the
    legacy formats: width 16; the K-quants: 32) -> uint8 [B, 2 n]."""
    b = qs.reshape(qs.shape[0], -1, 1, width)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(qs.shape[0], -1)


def _high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Q5_0/Q5_1 qh uint8 [B, 4] -> bit j of the 32-bit little-endian word as uint8 [B, 32],
    times 16."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh.unsqueeze(-1) >> shifts) & 1) << 4).reshape(qh.shape[0], n)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:], 16), 8, d, torch.zeros_like(d)


def _q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 16), 8, d, m + 8 * d  # d u + m = d (u - 8) + (m + 8 d)


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:], 16) | _high_bits(b[:, 2:6], 32), 16, d, torch.zeros_like(d)


def _q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 8:], 16) | _high_bits(b[:, 4:8], 32), 16, d, m + 16 * d


def _q8_0(b):
    d = _f16(b[:, 0:2])
    u = b[:, 2:] ^ 0x80  # int8 q as q + 128
    return u, 128, d, torch.zeros_like(d)


def _k_scales(b):
    """Q4_K / Q5_K: (d * sc, dmin * m), float32 [B, 8] each (as the reference dequantizes)."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    return d * sc.to(torch.float32), dmin * m.to(torch.float32)


def _q4_k(b):
    s, dm = _k_scales(b)
    return _nibbles(b[:, 16:], 32), 8, s, 8 * s - dm  # s u - dm = s (u - 8) + (8 s - dm)


def _q5_k(b):
    n = b.shape[0]
    s, dm = _k_scales(b)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    # bit j of qh[l] is bit 4 of value 32 j + l
    high = (((b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1) << 4).reshape(n, 256)
    return _nibbles(b[:, 48:], 32) | high, 16, s, 16 * s - dm


# format -> its decomposition, and its int4 planes (1: u in [0, 15]; 2: u in [0, 255])
_AFFINE: dict[Q, tuple[Callable, int]] = {
    Q.Q4_0: (_q4_0, 1),
    Q.Q4_1: (_q4_1, 1),
    Q.Q4_K: (_q4_k, 1),
    Q.Q5_0: (_q5_0, 2),
    Q.Q5_1: (_q5_1, 2),
    Q.Q5_K: (_q5_k, 2),
    Q.Q8_0: (_q8_0, 2),
}
PLANE_FORMATS = frozenset(_AFFINE)


def decode(raw: torch.Tensor, qtype: Q, k: int):
    """raw: uint8 [R, row_bytes] of a format in PLANE_FORMATS -> (u uint8 [R, k], offset,
    s float32 [R, k / 32], z float32 [R, k / 32]) with w = s * (u - offset) + z, each (s, z)
    over 32 consecutive values."""
    fmt = quant.get_format(qtype)
    rows = raw.shape[0]
    u, offset, s, z = _AFFINE[qtype][0](raw.reshape(-1, fmt.type_size))
    return u.reshape(rows, k), offset, s.reshape(rows, k // GROUP), z.reshape(rows, k // GROUP)


def affine(raw: torch.Tensor, qtype: Q, k: int):
    """-> (q int32 [R, k], s, z) with w = s * q + z: decode's integers centred."""
    u, offset, s, z = decode(raw, qtype, k)
    return u.to(torch.int32) - offset, s, z


def planes_of(u: torch.Tensor, offset: int, s: torch.Tensor, z: torch.Tensor, n_planes: int):
    """-> [(v uint8 [R, k] in [0, 15], scale, zero)] whose int4pack sum (v - 8) * scale + zero
    is s * (u - offset) + z."""
    if n_planes == 1:  # offset 8: v = u
        return [(u, s, z)]
    # q = u - offset = 16 h + l: h = (u >> 4) - offset / 16 in [-8, 7], l = u & 15
    high = (u >> 4) + (8 - offset // 16)
    return [(high, 16 * s, torch.zeros_like(z)), (u & 0x0F, s, 8 * s + z)]


# ---------------------------------------------------------------------------------------------
# the forms


class Int4Planes:
    """A weight [n, k] as the sum of int4-packed planes (see the module docstring). A weight
    packed as part of a merge group (pack_group) holds views of the group's planes and knows
    (`group`, its first row there), so that merging the parts gives the group's form back
    without a copy."""

    __slots__ = ("n", "k", "planes", "group", "exact")

    def __init__(
        self,
        n: int,
        k: int,
        planes: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        group: tuple[Int4Planes, int] | None = None,
    ):
        self.n, self.k = n, k
        self.planes = planes  # ((packed uint8 [n_pad, k / 2], scale_zeros bf16 [k/32, n_pad, 2]),)
        self.group = group
        # the output projection's exact (s, z) of w = s q + z (f16 where that holds them
        # exactly, z None when 0): its top candidates are recomputed in float32 (linear)
        self.exact: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + sz.numel() * sz.element_size()
                   for p, sz in self.planes)  # fmt: skip

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, k] -> float32 [M, n]."""
        xb = x.to(torch.bfloat16).contiguous()
        packed, sz = self.planes[0]
        # a part of a group used on its own has a strided view of the group's scales
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, GROUP, sz.contiguous()).float()
        for packed, sz in self.planes[1:]:
            y += torch._weight_int4pack_mm_for_cpu(xb, packed, GROUP, sz.contiguous())
        y = y if y.shape[1] == self.n else y[:, : self.n]
        if self.exact is not None:
            _refine(self, x, y)
        return y

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [len(idx), k]: rows of the exact weights (s q + z, as the reference up to
        float32 rounding), q read from the planes."""
        rows = int4_block()
        block, j = idx // rows, idx % rows
        high = (j >= rows // 2)[:, None]
        col = j % (rows // 2)
        q = None
        for packed, _ in self.planes:
            b = packed.view(-1, self.k, rows // 2)[block, :, col]  # [R, k]
            v = torch.where(high, b >> 4, b & 0x0F).to(torch.int32) - 8
            q = v if q is None else q * 16 + (v + 8)  # two planes: 16 h + l
        s, z = self.exact
        s = s[idx].float().repeat_interleave(GROUP, 1)
        out = q.to(torch.float32) * s
        return out if z is None else out + z[idx].float().repeat_interleave(GROUP, 1)

    def dense(self) -> torch.Tensor:
        """float32 [n, k]: the values the planes hold (for tests; the kernel rounds to bf16)."""
        out = torch.zeros(self.n, self.k)
        for packed, sz in self.planes:
            v = unpack_int4(packed, self.k)[: self.n].to(torch.float32) - 8
            s = sz[:, : self.n, 0].t().float().repeat_interleave(GROUP, 1)
            z = sz[:, : self.n, 1].t().float().repeat_interleave(GROUP, 1)
            out += v * s + z
        return out

    @staticmethod
    def concat(forms: list) -> object:
        """The group the parts were packed in, or their row blocks joined when no part is
        padded; otherwise a Concat."""
        first = forms[0]
        group = first.group[0] if isinstance(first, Int4Planes) and first.group else None
        if group is not None:
            row, ok = 0, True
            for f in forms:
                ok = ok and isinstance(f, Int4Planes) and f.group == (group, row)
                row += f.n if ok else 0
            if ok and row == group.n:
                return group
        if all(
            isinstance(f, Int4Planes)
            and f.k == first.k
            and len(f.planes) == len(first.planes)
            and f.n % ROW_ALIGN == 0
            for f in forms
        ):
            planes = tuple(
                (
                    torch.cat([f.planes[i][0] for f in forms]),
                    torch.cat([f.planes[i][1] for f in forms], dim=1),
                )
                for i in range(len(first.planes))
            )
            return Int4Planes(sum(f.n for f in forms), first.k, planes)
        return Concat(forms)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """torch's CPU int4 packing uint8 [n_pad, k / 2] -> uint8 [n_pad, k] of the values."""
    n_pad, rows = packed.shape[0], int4_block()
    b = packed.reshape(n_pad // rows, k, rows // 2)
    v = torch.cat([b & 0x0F, b >> 4], dim=-1)  # [n_pad / rows, k, rows]
    return v.transpose(1, 2).reshape(n_pad, k)


def _refine(form, x: torch.Tensor, y: torch.Tensor) -> None:
    """Recompute each row's REFINE_TOP largest outputs in float32 from the exact weights
    (form.rows): the logits that decide and dominate sampling. bfloat16's rounding of a logit
    of 25 is up to 0.06, which flips near ties; measured on the demo model (512 tokens of
    wiki.test.raw): mean KLD against the reference 5.5e-4 -> 3.7e-4, as much as recomputing
    all 49152 (3.6e-4)."""
    top = min(REFINE_TOP, form.n)
    step = max(1, REFINE_VALUES // (top * form.k))
    for r in range(0, x.shape[0], step):
        xs, ys = x[r : r + step], y[r : r + step]
        idx = _top_indices(ys, top)  # [m, top]
        w = form.rows(idx.flatten()).view(*idx.shape, form.k)  # [m, top, k]
        ys.scatter_(1, idx, torch.bmm(w, xs[:, :, None]).squeeze(-1))


TOP_BLOCK = 64  # values per block of _top_indices


def _top_indices(y: torch.Tensor, top: int) -> torch.Tensor:
    """The indices of each row's `top` largest values (in no order), as topk's: the rows'
    `top` blocks of TOP_BLOCK values with the largest maxima, then the largest values among
    those. A value of the row's top lies in a block whose maximum is at least that value, and
    at most `top` blocks hold one, so those blocks hold them all. torch.topk over a row costs
    with its length: 270 us for the demo model's 49152 logits, against 25 us here (one thread)."""
    m, n = y.shape
    blocks = n // TOP_BLOCK
    if blocks < 2 * top:
        return y.topk(top, dim=1, sorted=False).indices
    full = blocks * TOP_BLOCK
    best = y[:, :full].view(m, blocks, TOP_BLOCK).amax(-1).topk(top, dim=1, sorted=False).indices
    idx = (best[:, :, None] * TOP_BLOCK + torch.arange(TOP_BLOCK, device=y.device)).view(m, -1)
    if full < n:  # the last values, short of a block: candidates all
        idx = torch.cat([idx, torch.arange(full, n, device=y.device).expand(m, -1)], dim=1)
    return idx.gather(1, y.gather(1, idx).topk(top, dim=1, sorted=False).indices)


class Int8Blocks:
    """A Q8_0 weight with many rows (a vocabulary: the output projection, a tied embedding) as
    its int8 values by block, [k / 32, n, 32], one `torch._weight_int8pack_mm` per block of 32
    with the block's scales as its per-row scales (bfloat16, as the planes' are), partial sums
    added in float32. 1.0625 bytes a value plus the exact scales (float16: 0.0625), against
    1.25 + 0.0625 as two planes; measured on the demo model's 49152 x 576 output projection,
    one row, two threads: 2.11 ms against 1.83 ms for the planes, so it is used for memory
    only, on matrices of at least INT8_MIN_ROWS rows (with 1536 rows the 18 calls cost 2.4x
    the planes). Each row's REFINE_TOP largest outputs are recomputed exactly, as the planes'."""

    __slots__ = ("n", "k", "q", "d", "exact")

    def __init__(self, q: torch.Tensor, d: torch.Tensor, exact: torch.Tensor):
        self.q, self.d, self.exact = q, d, exact  # int8 [G, n, 32], bf16 [G, n], f16 [n, G]
        self.n, self.k = q.shape[1], q.shape[0] * GROUP

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.exact))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # [G, M, 32]: each block's activations contiguous, one copy for all blocks
        xs = x.to(torch.bfloat16).reshape(x.shape[0], -1, GROUP).transpose(0, 1).contiguous()
        y = torch._weight_int8pack_mm(xs[0], self.q[0], self.d[0]).float()
        for g in range(1, self.q.shape[0]):
            y += torch._weight_int8pack_mm(xs[g], self.q[g], self.d[g])
        _refine(self, x, y)
        return y

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [len(idx), k]: d * q as the reference computes it (bit-exact)."""
        q = self.q[:, idx].permute(1, 0, 2).reshape(idx.shape[0], self.k).to(torch.float32)
        return q * self.exact[idx].float().repeat_interleave(GROUP, 1)

    def dense(self) -> torch.Tensor:
        return self.rows(torch.arange(self.n))

    @staticmethod
    def concat(forms: list) -> object:
        return Concat(forms)


INT8_MIN_ROWS = 16384


def pack_int8_blocks(raw: torch.Tensor, n: int, k: int) -> Int8Blocks:
    """raw: Q8_0 uint8 [n, row_bytes] -> Int8Blocks, in chunks of rows."""
    g = k // GROUP
    q = torch.empty(g, n, GROUP, dtype=torch.int8)
    d = torch.empty(g, n, dtype=torch.bfloat16)
    exact = torch.empty(n, g, dtype=torch.float16)
    step = max(1, PACK_VALUES // k)
    for r in range(0, n, step):
        blocks = raw[r : r + step].reshape(-1, g, 34)
        rows = blocks.shape[0]
        scale = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows, g)
        exact[r : r + rows] = scale
        d[:, r : r + rows] = scale.t().to(torch.bfloat16)
        q[:, r : r + rows] = blocks[..., 2:].contiguous().view(torch.int8).transpose(0, 1)
        release_pages(raw[r : r + step])
    return Int8Blocks(q, d, exact)


class Dense:
    """F32 or BF16 weight [n, k]: the GGUF bytes viewed as floats."""

    __slots__ = ("w", "wt")

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.wt = w.t()  # the transposed view F.linear makes at every call, made once

    @property
    def nbytes(self) -> int:
        return 0  # the file's own bytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.w.dtype == torch.float32:
            # the mm F.linear runs for a 2-D input without bias (bitwise the same), in one call
            return torch.mm(x, self.wt) if x.dim() == 2 else F.linear(x, self.w)
        return F.linear(x.to(self.w.dtype), self.w).float()

    @staticmethod
    def concat(forms: list) -> object:
        first = forms[0]
        if all(isinstance(f, Dense) and f.w.dtype == first.w.dtype for f in forms):
            # one mat-mul instead of several (small models are bound by the calls); the parts'
            # file pages are given back, so memory holds the bytes once
            w = torch.cat([f.w for f in forms])
            for f in forms:
                release_pages(f.w)
            return Dense(w)
        return Concat(forms)


class Dequant:
    """Any format: its rows dequantized per call in chunks (no float32 copy kept)."""

    __slots__ = ("weight", "rows")

    def __init__(self, weight: Weight):
        self.weight = weight
        self.rows = max(1, DEQUANT_VALUES // weight.shape[-1])

    @property
    def nbytes(self) -> int:
        return 0

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        n, k = w.shape
        if n <= self.rows:
            return F.linear(x, w.dense())
        out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
        for r in range(0, n, self.rows):
            chunk = quant.dequantize(w.raw[r : r + self.rows], w.qtype, k)
            out[:, r : r + chunk.shape[0]] = F.linear(x, chunk)
        return out

    @staticmethod
    def concat(forms: list) -> object:
        return Concat(forms)


class Concat:
    """A merged weight whose parts keep their own forms: the outputs side by side."""

    __slots__ = ("forms",)

    def __init__(self, forms: list):
        self.forms = [g for f in forms for g in (f.forms if isinstance(f, Concat) else [f])]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.forms)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f.linear(x) for f in self.forms], dim=-1)

    @staticmethod
    def concat(forms: list) -> object:
        return Concat(forms)


# ---------------------------------------------------------------------------------------------
# packing


def f32_view(w: Weight) -> torch.Tensor:
    """float32 [*shape] of an F32 weight: its bytes viewed, no copy."""
    return quant.dequantize(w.raw, w.qtype, w.shape[-1]).reshape(w.shape)


def pack(w: Weight, arena: Arena | None = None, exact: bool = False) -> object:
    """The form of a 2-D weight (see the module docstring); exact: keep what recomputing the
    top outputs exactly takes (the output projection: Int4Planes._refine)."""
    n, k = w.shape
    if w.qtype == Q.F32:
        return Dense(f32_view(w))
    if w.qtype == Q.BF16:
        return Dense(w.raw.contiguous().view(torch.bfloat16).reshape(n, k))
    if as_int8_blocks(w, exact):
        return pack_int8_blocks(w.raw, n, k)
    if packable(w):
        form = pack_planes(w.raw, w.qtype, n, k, arena, exact)
        release_pages(w.raw)
        return form
    return Dequant(w)


def packable(w: Weight) -> bool:
    """Whether a 2-D weight becomes Int4Planes."""
    return (
        w.qtype in _AFFINE
        and int4pack_available()
        and int4_block() is not None
        and w.shape[-1] % GROUP == 0
    )


def n_planes(qtype: Q) -> int:
    return _AFFINE[qtype][1]


def plane_bytes(w: Weight) -> tuple[int, int]:
    """(packed bytes, scale_zeros values) of one plane of a packable weight."""
    n, k = w.shape
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    return n_pad * k // 2, k // GROUP * n_pad * 2


class Arena:
    """One allocation for every packed plane of a model, handed out in order: the packing
    temporaries then never sit between long-lived buffers (the heap stays compact, and the
    peak memory of a load is the packed size plus one chunk's temporaries)."""

    def __init__(self, packed_bytes: int, sz_values: int):
        self.u8 = torch.empty(packed_bytes, dtype=torch.uint8)
        self.bf16 = torch.empty(sz_values, dtype=torch.bfloat16)
        self.at_u8 = self.at_bf16 = 0

    def take(self, n_pad: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (packed uint8 [n_pad, k / 2], scale_zeros bf16 [k / 32, n_pad, 2])."""
        nb, ns = n_pad * k // 2, k // GROUP * n_pad * 2
        packed = self.u8[self.at_u8 : self.at_u8 + nb].view(n_pad, k // 2)
        sz = self.bf16[self.at_bf16 : self.at_bf16 + ns].view(k // GROUP, n_pad, 2)
        self.at_u8 += nb
        self.at_bf16 += ns
        return packed, sz


def pack_group(ws: list[Weight], arena: Arena | None = None) -> Int4Planes:
    """Weights of one format and width whose rows a merged weight will hold side by side (Q, K,
    V; gate, up), packed into one form; each gets its rows' part of it (`packed`), which
    concat_rows turns back into the whole. All but the last have rows a multiple of 64."""
    qtype, k = ws[0].qtype, ws[0].shape[1]
    n = sum(w.shape[0] for w in ws)
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    planes = _alloc(qtype, n_pad, k, arena)
    whole = Int4Planes(n, k, planes)
    row = 0
    for w in ws:
        m = w.shape[0]
        m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN if w is ws[-1] else m
        part = tuple((p[row : row + m_pad], sz[:, row : row + m_pad]) for p, sz in planes)
        _pack_into(w.raw, qtype, m, k, part)
        w.packed = Int4Planes(m, k, part, group=(whole, row))
        release_pages(w.raw)
        row += m
    return whole


def _alloc(qtype: Q, n_pad: int, k: int, arena: Arena | None):
    n_planes = _AFFINE[qtype][1]
    if arena is not None:
        return tuple(arena.take(n_pad, k) for _ in range(n_planes))
    return tuple(
        (
            torch.empty(n_pad, k // 2, dtype=torch.uint8),
            torch.empty(k // GROUP, n_pad, 2, dtype=torch.bfloat16),
        )
        for _ in range(n_planes)
    )


def pack_planes(
    raw: torch.Tensor,
    qtype: Q,
    n: int,
    k: int,
    arena: Arena | None = None,
    exact: bool = False,
) -> Int4Planes:
    """raw: uint8 [n, row_bytes] -> Int4Planes, packed in chunks of rows (bounded temporaries);
    exact: with the exact scales and zeros (Int4Planes.exact)."""
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    planes = _alloc(qtype, n_pad, k, arena)
    form = Int4Planes(n, k, planes)
    scales = _pack_into(raw, qtype, n, k, planes, exact)
    if scales is not None:
        s, z = (torch.cat(t)[:n] for t in scales)
        form.exact = (_narrow(s), None if not z.any() else _narrow(z))
    return form


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """float16 when that holds every value exactly (Q8_0's d, Q4_1's m), else float32."""
    h = t.to(torch.float16)
    return h if torch.equal(h.float(), t) else t


def _pack_into(raw: torch.Tensor, qtype: Q, n: int, k: int, planes, exact: bool = False):
    """Fill planes (packed [n_pad, k / 2], scale_zeros [k / 32, n_pad, 2] views) from raw's n
    rows; rows n..n_pad are zeros. -> ([s chunks], [z chunks]) of w = s q + z when exact."""
    kept = ([], []) if exact else None
    n_planes = _AFFINE[qtype][1]
    packed = [p for p, _ in planes]
    sz = [s for _, s in planes]
    n_pad = packed[0].shape[0]
    step = max(1, PACK_VALUES // (k * ROW_ALIGN)) * ROW_ALIGN
    for r in range(0, n_pad, step):
        rows = min(step, n_pad - r)
        chunk = raw[r : min(r + rows, n)]
        u, offset, s, z = decode(chunk, qtype, k)
        release_pages(chunk)  # read: a large weight's file pages never all mapped at once
        if kept is not None:
            kept[0].append(s)
            kept[1].append(z)  # w = s q + z, q = u - offset as the planes hold it
        if u.shape[0] < rows:  # the padding rows: scale = zero = 0, so they are zeros
            u, s, z = (F.pad(t, (0, 0, 0, rows - t.shape[0])) for t in (u, s, z))
        for i, (v, scale, zero) in enumerate(planes_of(u, offset, s, z, n_planes)):
            packed[i][r : r + rows] = pack_int4(v)
            sz[i][:, r : r + rows] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
    return kept


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """v: uint8 [R, k] of 0..15 (R a multiple of ROW_ALIGN) -> torch's CPU int4 packing [R, k / 2]
    with B = int4_block() rows a block: byte (b, c, j) of [R / B, k, B / 2] = v[B b + j, c] |
    v[B b + B / 2 + j, c] << 4. Built here with uint8 ops (torch's converter wants int32
    values: 4x the temporaries)."""
    return _interleave(v, int4_block())


def _interleave(v: torch.Tensor, rows: int) -> torch.Tensor:
    """pack_int4 with `rows` rows a block."""
    r, k = v.shape
    b = v.reshape(r // rows, 2, rows // 2, k)
    pairs = b[:, 0] | (b[:, 1] << 4)  # [R / B, B / 2, k]
    return pairs.transpose(1, 2).reshape(r, k // 2)


_INT4_BLOCK: int | None = None


def int4_block() -> int | None:
    """The output rows torch's CPU int4 packing interleaves on this machine: its kernel's block
    of N, 64 where it runs AVX-512 and 32 on AVX2 (torch 2.13). Found once per process by
    matching torch's own converter (`_convert_weight_to_int4pack_for_cpu`); None when neither
    layout matches (another torch or CPU): then nothing is packed for that kernel (packable),
    since the planes could not be read back (rows, dense)."""
    global _INT4_BLOCK
    if _INT4_BLOCK is None:
        _INT4_BLOCK = 0
        if hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
            g = torch.Generator().manual_seed(0)
            n, k = 2 * ROW_ALIGN, 3 * GROUP
            v = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
            theirs = torch._convert_weight_to_int4pack_for_cpu(v, 2)
            for rows in (64, 32):  # ROW_ALIGN is a multiple of both
                if torch.equal(_interleave(v.to(torch.uint8), rows), theirs):
                    _INT4_BLOCK = rows
                    break
    return _INT4_BLOCK or None


# ---------------------------------------------------------------------------------------------
# giving back the file pages a packed weight no longer reads

_MADV_DONTNEED = 4
_file_maps: list[tuple[int, int]] | None = None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system after a load (glibc: malloc_trim)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):  # not glibc
            pass


def release_code_pages() -> int:
    """Drop the resident pages of this process's clean executable file mappings (the shared
    libraries' code: torch's above all) -> bytes of mappings advised. The load runs torch kernels
    the model never runs again (unpacking, packing, checks: about 17 MB of libtorch_cpu's code
    for the demo model), and importing torch touches about 90 MB of code once: the kernel keeps
    them resident until memory runs short. Dropped, a page that is used again is mapped again
    from the page cache on its next use (a minor fault). Only r-xp mappings with no private
    dirty page are touched (code the dynamic linker never patched): their pages are the
    file's, so dropping them loses nothing."""
    if not sys.platform.startswith("linux"):
        return 0
    ranges, current, clean = [], None, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    if current is not None and clean:
                        ranges.append(current)
                    code = len(head) == 6 and head[1] == "r-xp" and head[5].startswith("/")
                    current = tuple(int(x, 16) for x in head[0].split("-")) if code else None
                    clean = True
                elif current is not None and head[0] in ("Private_Dirty:", "Anonymous:"):
                    clean = clean and head[1] == "0"
        if current is not None and clean:
            ranges.append(current)
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    advised = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
            advised += hi - lo
    return advised


def scan_file_mappings() -> None:
    """Note the address ranges of this process's file-backed mappings (Linux: /proc/self/maps);
    release_pages only ever touches those."""
    global _file_maps
    _file_maps = []
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    _file_maps.append((int(lo, 16), int(hi, 16)))
    except OSError:
        _file_maps = []


def release_pages(t: torch.Tensor) -> bool:
    """Drop the whole pages of a tensor that is a view of a file mapping (a GGUF's memory map)
    from this process's memory: they are the file's, unchanged, and a later read (the reference
    dequantizing them) maps them again. Anonymous memory is never touched. -> whether any were."""
    if _file_maps is None:
        scan_file_mappings()
    if not _file_maps or t.device.type != "cpu" or not t.is_contiguous():
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in _file_maps):
        return False
    page = mmap.PAGESIZE
    a, b = -(-start // page) * page, end // page * page
    if b <= a:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0

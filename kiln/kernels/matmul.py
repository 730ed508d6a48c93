"""Launchers of the quantized GEMM (kernels/triton/matmul.py) and of its alternative,
dequant_matmul: asserts, allocates, picks a config (tuned per GPU, format, N, K and M bucket) and
the grid.

    matmul(x: [M, K] f16/bf16/f32, weight: Weight [N, K]) -> [M, N] float32 (or bf16)
    dequant_matmul(x, weight) -> the same, as the weight dequantized to a kept bf16 buffer and
                                 torch's bf16 matmul (cuBLAS on a GPU)

Both round x and the weight to bf16 and accumulate in fp32: their reference is
kiln.ops.reference.linear(x.float(), weight) within the bf16 bound of tests/kernels/tolerances.py
(MATMUL). matmul(..., exact=True) keeps x and the weight tiles in fp32 (tf32x3 products): within
a few fp32 ulps of the reference, for batched decode. A config with quants=True runs the kernel
in the quant domain (the weight's integer quants on the tensor cores, its scales applied per
group: triton/matmul.py): only x is rounded, so it is within tolerances.QUANTS_REL of the
reference of the bf16 x; with exact=True x enters as three bf16 parts and is not rounded either
(within the exact GEMM's bound). Which of the two runs for a shape is data:
`method` reads the table that scripts/tune_matmul.py measured on this GPU
(kernels/configs/matmul,device=<gpu>.json, named by kiln.kernels.config_name); without an entry,
the Triton kernel. kiln/kernels/linear.py is the one dispatch by M (the mat-vec up to
matvec.MAX_M rows, or the exact GEMM where batch_method asks for it; these above).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.kernels import CONFIG_DIR, cdiv, config_name, interpreting, next_power_of_2, pdl_launch
from kiln.kernels.formats import FLOAT_VIEW, FORMAT_IDS, SUPPORT
from kiln.kernels.triton import matmul as _k
from kiln.weight import Weight

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OUT_DTYPES = (torch.float32, torch.bfloat16)
# The M buckets of the tuned table: M is looked up as the smallest bucket >= M (above 8192: 8192).
# The GEMM serves M > matvec.MAX_M = 8, so the first bucket holds M = 9..16.
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
METHODS = ("triton", "dequant")  # the GEMM kernel; dequant_matmul


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int  # output rows per program (swap_ab: 16..256; else >= 64 for wgmma)
    block_n: int  # output columns (weight rows) per program (swap_ab: >= 16 * num_warps)
    block_k: int  # values of K per step: a power of two, >= 32 for the block formats
    group_m: int  # row tiles per group of the launch order (L2 reuse of the weight tiles)
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop
    swap_ab: bool = True  # out^T = W @ x^T: the weight tile from registers (triton/matmul.py)
    splits: int | None = None  # K ranges run by programs of their own; None: auto_splits
    # the weight tile's loads issued a step early, in registers (triton/matmul.py _k_loop)
    ahead: bool = False
    # the quant domain (triton/matmul.py _k_loop_quants): the weight's integer quants on the
    # tensor cores, its scales applied per group of values; block formats, swap_ab (ahead:
    # Q4_K and Q5_K at block_k 256)
    quants: bool = False


# Programs a launch aims at with split-K (auto_splits): about 4 an SM of an H100.
TARGET_PROGRAMS = 512
# Split-K only serves decode-sized launches (M up to this): there a weight-streaming launch has
# too few output tiles to keep an H100's 132 SMs reading (N = 4096 in tiles of 64 weight rows is
# 64 programs); above, the row tiles fill the GPU and a split would only add its partial sums.
SPLIT_M_MAX = 64


# The exact GEMM's config (batched decode, M = 2..8): 16 rows, the weight from registers, 128
# weight rows a program (no spills at 4 warps in the sm_90 compile of every format; 64 rows with
# BLOCK_K 128 spill for Q6_K, Q8_0 and F16).
EXACT_CONFIG = MatmulConfig(16, 128, 64, 1, 4, 3)


def m_bucket(m: int) -> int:
    """The tuned table's bucket of M: the smallest of M_BUCKETS >= m (the largest above it)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


@functools.cache
def tuned_configs(device_name: str) -> dict[tuple[str, int, int, int], tuple[str, MatmulConfig]]:
    """{(format, N, K, M bucket): (method, the fastest Triton config)} measured on this GPU
    model by scripts/tune_matmul.py, {} if never tuned. The file:
    {"Q4_K": {"4096x4096": {"512": {"method": "triton", "block_m": 128, ..., "us": ...}}}}."""
    path = CONFIG_DIR / config_name("matmul", device_name)
    if not path.exists():
        return {}
    out = {}
    for fmt, shapes in json.loads(path.read_text()).items():
        for shape, buckets in shapes.items():
            n, k = (int(v) for v in shape.split("x"))
            for bucket, c in buckets.items():
                assert c["method"] in METHODS, f"{path}: {fmt} {shape} {bucket}: {c['method']}"
                cfg = MatmulConfig(**{f: c[f] for f in MatmulConfig.__dataclass_fields__ if f in c})
                out[(fmt, n, k, int(bucket))] = (c["method"], cfg)
    return out


def _tuned(qtype: GGMLQuantizationType, n: int, k: int, m: int, device) -> tuple | None:
    if device is None or device.type != "cuda":
        return None
    table = tuned_configs(torch.cuda.get_device_name(device))
    return table.get((qtype.name, n, k, m_bucket(m)))


def default_config(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    m: int,
    device: torch.device | None = None,
    tuned: bool = True,
) -> MatmulConfig:
    """The Triton config tuned for this (format, N, K, M bucket) on this GPU, else the untuned
    default for M. Chosen without a GPU at hand, from the sm_90 SASS of the K loop (see
    kernels/triton/matmul.py): the weight from registers (swap_ab), so that wgmma serves every
    M and overlaps the dequantization; 16 and 32 rows with BLOCK_K 128 (4 warps, 64 weight rows
    a warpgroup) for M up to 32; 64 rows up to M = 64; 128 x 128 x 64 on 8 warps up to 1024
    (M = 512 of a 4096-wide weight is 128 programs, one wave of an H100's 132 SMs); 256 rows
    above, where the dequantization of a weight tile serves twice the rows (8 warps, 232-246
    registers, no spills). scripts/tune_matmul.py replaces it per shape."""
    if tuned:
        entry = _tuned(qtype, n, k, m, device)
        if entry is not None:
            return entry[1]
    if m <= 16:
        return MatmulConfig(16, 64, 128, 1, 4, 3)
    if m <= 32:
        return MatmulConfig(32, 64, 128, 1, 4, 3)
    if m <= 64:
        return MatmulConfig(64, 128, 64, 8, 4, 3)
    if m <= 1024:
        return MatmulConfig(128, 128, 64, 8, 8, 3)
    return MatmulConfig(256, 128, 64, 8, 8, 3)


def auto_splits(m: int, n: int, k: int, cfg: MatmulConfig) -> int:
    """K splits for a launch without a tuned count: for M <= SPLIT_M_MAX, enough to bring the
    output tiles up to TARGET_PROGRAMS, each split at least 4 BLOCK_K steps; else 1."""
    if cfg.splits is not None:
        return cfg.splits
    if m > SPLIT_M_MAX:
        return 1
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    steps = cdiv(k, cfg.block_k)
    return max(1, min(cdiv(TARGET_PROGRAMS, tiles), steps // 4))


def method(qtype: GGMLQuantizationType, n: int, k: int, m: int, device=None) -> str:
    """The method for this shape on this GPU, the tuned table's choice: "triton" (the GEMM
    kernel; also where the table has no entry) or "dequant" (dequant_matmul)."""
    entry = _tuned(qtype, n, k, m, device)
    return entry[0] if entry is not None else "triton"


def _check_weight(weight: Weight) -> tuple[int, int]:
    """(N, K) of a weight the kernels read: 2-D, a supported format, uint8 blocks [N, row_bytes]."""
    assert len(weight.shape) == 2, f"matmul needs a 2-D weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["matmul"], f"matmul does not support {weight.qtype.name}"
    assert weight.raw is not None, f"weight {weight.name} has no blocks of its own (merged parts)"
    n, k = weight.shape
    raw = weight.raw
    block_values, type_size = GGML_QUANT_SIZES[weight.qtype]
    assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride(1) == 1, (
        f"weight {weight.name}: raw must be uint8 [N, row_bytes] with unit last stride"
    )
    assert k % block_values == 0 and tuple(raw.shape) == (n, k // block_values * type_size), (
        f"weight {weight.name}: raw {tuple(raw.shape)} does not hold {weight.qtype.name} [{n}, {k}]"
    )
    return n, k


def _check(x: torch.Tensor, weight: Weight, out_dtype: torch.dtype) -> tuple[int, int, int]:
    """(M, N, K) of a launch: x [M, K] f16/bf16/f32 on the weight's device, a kernel's weight."""
    assert x.dim() == 2, f"x must be a 2-D [M, K]; got {tuple(x.shape)}"
    assert x.dtype in _X_DTYPES, f"x must be f16/bf16/f32; got {x.dtype}"
    assert out_dtype in _OUT_DTYPES, f"the output is float32 or bfloat16; got {out_dtype}"
    n, k = _check_weight(weight)
    m = x.shape[0]
    assert x.shape[1] == k, f"x has K={x.shape[1]}, weight {weight.name} has K={k}"
    assert x.device == weight.device, f"x on {x.device}, weight on {weight.device}"
    return m, n, k


def _weight_view(weight: Weight) -> torch.Tensor:
    """The tensor the kernels read: the typed view of a float format, else the uint8 blocks."""
    raw = weight.raw
    if weight.qtype not in FLOAT_VIEW:
        return raw
    size = FLOAT_VIEW[weight.qtype].itemsize
    assert raw.data_ptr() % size == 0 and raw.stride(0) % size == 0, (
        f"weight {weight.name}: {weight.qtype.name} rows must start on {size}-byte boundaries"
    )
    return raw.view(FLOAT_VIEW[weight.qtype])


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: bf16 with unit stride along K (one cast for f16/f32 x)."""
    x = x.to(torch.bfloat16)
    return x if x.stride(1) == 1 else x.contiguous()


def _tile_args(qtype: GGMLQuantizationType, k: int, block_k: int, k_split: int = 0) -> dict:
    """The format's and the K loop's constexprs; EVEN_K: no step of any split (k_split values
    each; 0: one split) runs past K."""
    block_values, type_size = GGML_QUANT_SIZES[qtype]
    assert block_k >= 16 and block_k & (block_k - 1) == 0, f"block_k {block_k}: a power of two"
    assert block_values == 1 or block_k >= 32, f"block_k {block_k}: {qtype.name} needs >= 32"
    return {
        "FMT": FORMAT_IDS[qtype],
        "BLOCK_K": block_k,
        "TYPE_SIZE": type_size,
        "BLOCK_VALUES": block_values,
        "EVEN_K": k % block_k == 0 and (k_split == 0 or k % k_split == 0),
        "INTERPRETED": interpreting(),
    }


_K4 = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K)


def _quants_x(
    x: torch.Tensor, qtype: GGMLQuantizationType, cfg: MatmulConfig, exact: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The quant domain's (MatmulConfig.quants) x: (x in bf16 [M, K], or exact: fp32 x as the
    three bf16 parts that add up to it [3, M, K]; the per-group sums of x's values, fp32
    [M, K // group]; the group: 16 values for Q6_K, its scales' span, else 32)."""
    assert GGML_QUANT_SIZES[qtype][0] > 1, f"quants: {qtype.name} is not a block format"
    assert cfg.swap_ab, "quants: swap_ab"
    assert not cfg.ahead or (qtype in _K4 and cfg.block_k == 256), (
        "quants: ahead serves Q4_K and Q5_K at block_k 256 (one super-block a step)"
    )
    assert GGML_QUANT_SIZES[qtype][0] == 32 or cfg.block_k % 256 == 0, (
        f"quants: a {qtype.name} step is whole super-blocks (block_k a multiple of 256)"
    )
    group = 16 if qtype == GGMLQuantizationType.Q6_K else 32
    m, k = x.shape
    if exact:  # hi + mid + lo == x: 3 x 8 significant bits hold fp32's 24
        x32 = x.float()
        hi = x32.to(torch.bfloat16)
        rest = x32 - hi.float()
        mid = rest.to(torch.bfloat16)
        xb = torch.stack([hi, mid, (rest - mid.float()).to(torch.bfloat16)])
        return xb, x32.reshape(m, k // group, group).sum(dim=-1), group
    xb = _bf16(x)
    return xb, xb.reshape(m, k // group, group).sum(dim=-1, dtype=torch.float32), group


def matmul(
    x: torch.Tensor,
    weight: Weight,
    config: MatmulConfig | None = None,
    out_dtype: torch.dtype = torch.float32,
    pdl: bool = False,
    exact: bool = False,
) -> torch.Tensor:
    """x: [M, K] -> [M, N] out_dtype = x @ W.T on tensor cores: x and the dequantized weight
    tiles in bf16, fp32 accumulation; exact: x and the weight tiles in fp32, multiplied as
    three tf32 products (within a few fp32 ulps of the reference: batched decode rows)."""
    m, n, k = _check(x, weight, out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or (EXACT_CONFIG if exact else default_config(weight.qtype, n, k, m, x.device))
    w = _weight_view(weight)
    if cfg.quants:
        xb, xs, group = _quants_x(x, weight.qtype, cfg, exact)
    else:
        xb = x.float().contiguous() if exact else _bf16(x)
        xs, group = xb, 32
    # Split-K: each split's partial sums in fp32, added in split order by torch (deterministic:
    # no atomics). The splits are whole BLOCK_K steps; the last one may run past K (zeros).
    k_split = cdiv(cdiv(k, auto_splits(m, n, k, cfg)), cfg.block_k) * cfg.block_k
    splits = cdiv(k, k_split)  # none empty
    part = out
    if splits > 1:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    else:
        k_split = k
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), splits)
    _k._matmul_kernel[grid](
        xb,
        xs,
        w,
        part,
        m,
        n,
        k,
        xb.stride(-2),  # a row (exact quants: of each part)
        w.stride(0),
        n if splits > 1 else out.stride(0),
        k_split,
        m * n if splits > 1 else 0,
        K_INTERP=k_split if interpreting() else 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab,
        **_tile_args(weight.qtype, k, cfg.block_k, k_split),
        EXACT=exact,
        AHEAD=cfg.ahead,
        QUANTS=cfg.quants,
        GROUP_VALUES=group,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(pdl),
    )
    if splits > 1 and out.dtype == torch.float32:
        torch.sum(part, dim=0, out=out)
    elif splits > 1:
        out.copy_(part.sum(dim=0))
    return out


# dequant_matmul's bf16 weight buffers, one per (device, N, K), kept for the process: every
# weight of a shape is dequantized into the same buffer right before its matmul (stream order
# keeps the uses apart). The largest shape chosen bounds the memory: e.g. 4096 x 24576 is 192 MiB.
_BUFFERS: dict[tuple[torch.device, int, int], torch.Tensor] = {}
# The dequantization kernel's tile: 8 KB of bf16 per program.
_DEQUANT_TILE = (32, 128)  # (rows, values)


def dequantize(weight: Weight, out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """The weight [N, K] dequantized and rounded to bf16 (round to nearest even, the values the
    GEMM's tiles hold), into out (bf16 [N, K], unit stride along K) or a new tensor."""
    n, k = _check_weight(weight)
    if out is None:
        out = torch.empty((n, k), dtype=torch.bfloat16, device=weight.device)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (n, k) and out.stride(1) == 1
    if n == 0 or k == 0:
        return out
    block_n, block_k = _DEQUANT_TILE
    block_k = min(block_k, max(32, next_power_of_2(k)))
    w = _weight_view(weight)
    grid = (cdiv(n, block_n), cdiv(k, block_k))
    _k._dequant_kernel[grid](
        w,
        out,
        n,
        k,
        w.stride(0),
        out.stride(0),
        BLOCK_N=block_n,
        **_tile_args(weight.qtype, k, block_k),
        num_warps=4,
        # Rounded as the reference dequantizes (d * q + m in two roundings, no FMA), so the
        # buffer is bf16(reference) bit for bit. The kernel moves bytes: the FMUL is free.
        enable_fp_fusion=False,
        **pdl_launch(pdl),
    )
    return out


def dequant_matmul(
    x: torch.Tensor,
    weight: Weight,
    out_dtype: torch.dtype = torch.float32,
    pdl: bool = False,
) -> torch.Tensor:
    """x: [M, K] -> [M, N] out_dtype: the weight dequantized to bf16 into the kept buffer of its
    shape (dequantize), then torch's bf16 matmul with fp32 accumulation (cuBLAS; on a GPU the
    fp32 output comes straight from it: torch.mm's out_dtype)."""
    m, n, k = _check(x, weight, out_dtype)
    key = (x.device, n, k)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.empty((n, k), dtype=torch.bfloat16, device=x.device)
    dequantize(weight, buf, pdl=pdl)
    xb = _bf16(x)
    if x.device.type == "cuda":
        if out_dtype == torch.float32:
            try:
                return torch.mm(xb, buf.T, out_dtype=torch.float32)
            except TypeError:  # torch < 2.8: no fp32 output; the bf16 one adds 2^-8 relative
                return torch.mm(xb, buf.T).float()
        return torch.mm(xb, buf.T)
    # CPU (tests): bf16 products are exact in fp32, so this is the same fp32-accumulated sum.
    return torch.mm(xb.float(), buf.float().T).to(out_dtype)


def release_buffers() -> None:
    """Drop dequant_matmul's kept bf16 buffers (their memory returns to torch's allocator)."""
    _BUFFERS.clear()

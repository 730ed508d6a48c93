"""Launcher of the decode mat-vec kernel (kernels/triton/matvec.py): asserts, allocates, picks a
config and the grid.

    matvec(x: [M, K] f16/bf16/f32 contiguous, weight: Weight [N, K]) -> [M, N] float32

M is a decode batch (1..8). The weight is read from its GGUF blocks with no float copy; its
reference is kiln.ops.reference.linear(x.float(), weight). `launch` also serves the MoE decode
mat-vec of kiln/kernels/moe.py: the same kernels with EXPERTS on, one grid column per selected
expert.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.kernels import CONFIG_DIR, cdiv, config_name, next_power_of_2, pdl_launch
from kiln.kernels.formats import FLOAT_VIEW, FORMAT_IDS, SUPPORT
from kiln.kernels.triton import matvec as _k
from kiln.weight import Weight

_T = GGMLQuantizationType

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_M = 8
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._matvec_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class LanesFormat:
    """How _matvec_lanes_m1_kernel (the M = 1 kernel of the block formats) reads a format."""

    view: torch.dtype  # integer view of the blocks; rows and experts must start on its items
    lanes: int  # lanes (threads) per block
    fmt: int  # the kernel's FMT


# The formats of SUPPORT["matvec_lanes"] (kernels/formats.py). The block sizes allow int16 words
# (Q8_0: 34 B, Q4_0: 18 B, Q5_0: 22 B, Q6_K: 210 B), int32 (Q4_1: 20 B) and int64 (Q5_1: 24 B,
# Q4_K: 144 B). A lane reads 4 bytes of qs (8 with the int64 view); Q6_K's lane reads 8 bytes of
# each of ql's halves and of qh.
_WIDE: dict[GGMLQuantizationType, LanesFormat] = {
    _T.Q8_0: LanesFormat(torch.int16, 8, FORMAT_IDS[_T.Q8_0]),
    _T.Q4_0: LanesFormat(torch.int16, 4, FORMAT_IDS[_T.Q4_0]),
    _T.Q4_1: LanesFormat(torch.int32, 4, FORMAT_IDS[_T.Q4_1]),
    _T.Q5_0: LanesFormat(torch.int16, 4, FORMAT_IDS[_T.Q5_0]),
    _T.Q5_1: LanesFormat(torch.int64, 2, FORMAT_IDS[_T.Q5_1]),
    _T.Q4_K: LanesFormat(torch.int64, 16, FORMAT_IDS[_T.Q4_K]),
    _T.Q6_K: LanesFormat(torch.int16, 8, FORMAT_IDS[_T.Q6_K]),
}
USE_WIDE = True  # False: every format on _matvec_kernel (benchmarks/matvec.py --compare)


def _aligned(raw: torch.Tensor, size: int) -> bool:
    """Whether an integer view of `size` bytes sees every row (and expert) start of raw."""
    return raw.data_ptr() % size == 0 and all(st % size == 0 for st in raw.stride()[:-1])


@dataclass(frozen=True)
class MatvecConfig:
    block_n: int  # output rows per program
    tile_values: int  # values of K per loop step (K-quants: 256 on the byte kernel)
    num_warps: int


# The lanes kernel's config where no tuned one applies. Chosen without a GPU at hand: the fewest
# sm_90 SASS instructions per value in the K loop over block_n 4..32, tile 512..2048, 2..8 warps
# (Q4_0 4.6 at 8/2048/4, 5.3 at 8/1024/4), and 64 blocks a step, so K = 4096 is 2 steps with 9 KB
# of a program's loads in flight each.
_LANES_DEFAULT = MatvecConfig(block_n=8, tile_values=2048, num_warps=4)


@functools.cache
def tuned_configs(device_name: str) -> dict[tuple[str, int, int, int], MatvecConfig]:
    """{(format, N, K, slots): config} measured on this GPU model at M = 1, {} if never tuned.
    A shape is "NxK" (a plain mat-vec: 1 slot) or "NxKxS" (the MoE launch of S selected experts,
    kiln/kernels/moe.py)."""
    path = CONFIG_DIR / config_name("matvec", device_name)
    if not path.exists():
        return {}
    out = {}
    for fmt, shapes in json.loads(path.read_text()).items():
        for shape, c in shapes.items():
            n, k, slots = parse_shape(shape)
            out[(fmt, n, k, slots)] = MatvecConfig(c["block_n"], c["tile_values"], c["num_warps"])
    return out


def parse_shape(shape: str) -> tuple[int, int, int]:
    """ "NxK" -> (N, K, 1); "NxKxS" -> (N, K, S)."""
    n, k, *slots = (int(v) for v in shape.split("x"))
    return n, k, slots[0] if slots else 1


def default_config(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    m: int,
    device: torch.device | None = None,
    tuned: bool = True,
    slots: int = 1,
) -> MatvecConfig:
    """The config tuned for this (format, N, K, slots: experts of one MoE launch) on this GPU
    (kernels/configs, M = 1), else the lanes kernel's default, else the byte kernel's
    per-family defaults: the fastest of
    benchmarks/matvec.py --sweep on an H100 for a 4096 x 4096 weight at M = 1 (e.g. Q8_0 22.8 us
    with 4/512/4 against 34.7 us with 8/256/4; Q4_K 23.4 us with 16/256/4 against 36.0 us with
    8/256/4)."""
    if tuned and USE_WIDE and m == 1 and device is not None and device.type == "cuda":
        cfg = tuned_configs(torch.cuda.get_device_name(device)).get((qtype.name, n, k, slots))
        if cfg is not None:
            return cfg
    if USE_WIDE and m == 1 and qtype in SUPPORT["matvec_lanes"]:
        return _LANES_DEFAULT
    if m > 1:
        return _rows_config(qtype, m)
    if qtype in FLOAT_VIEW or GGML_QUANT_SIZES[qtype][0] == 32:
        return MatvecConfig(block_n=4, tile_values=512, num_warps=4)
    if qtype == _T.Q6_K:
        return MatvecConfig(block_n=4, tile_values=256, num_warps=4)
    return MatvecConfig(block_n=16, tile_values=256, num_warps=4)


def _rows_config(qtype: GGMLQuantizationType, m: int) -> MatvecConfig:
    """The byte kernel at M > 1 keeps one fp32 accumulator per x row over the program's
    BLOCK_N x tile values (kernels/triton/matvec.py): at 4 warps, 64 registers a thread for all
    rows together (BLOCK_N * tile * M_PAD = 8192), so that M = 8 compiles without spills.
    K-quants' tile is one 256-value super-block."""
    per_row = 8192 // next_power_of_2(m)  # BLOCK_N * tile
    tile = 256 if GGML_QUANT_SIZES[qtype][0] == 256 else min(512, per_row // 4)
    return MatvecConfig(block_n=per_row // tile, tile_values=tile, num_warps=4)


def _blocks_per_step(k: int, block_values: int, cfg: MatvecConfig) -> int:
    """Blocks of the M = 1 integer-view kernels' loop step: cfg.tile_values of K, at most K
    rounded up to a power of two (K = 768: 3 super-blocks pad the last step; the kernels mask
    it)."""
    per_step = max(1, cfg.tile_values // block_values)
    return min(per_step, next_power_of_2(k // block_values))


def _lanes_tiling(
    k: int, qtype: GGMLQuantizationType, cfg: MatvecConfig, lanes: int | None = None
) -> dict[str, int | bool]:
    """S, R, EVEN of the lanes kernels (_matvec_lanes_m1_kernel; with `lanes`, the int8
    mat-vec's): a step of _blocks_per_step blocks is R tiles of S blocks, a tile one lane per
    thread where it can (lanes per block: LanesFormat.lanes unless given); EVEN when no step
    overruns K."""
    block_values = GGML_QUANT_SIZES[qtype][0]
    per_step = _blocks_per_step(k, block_values, cfg)
    s = min(max(1, 32 * cfg.num_warps // (lanes or _WIDE[qtype].lanes)), per_step)
    return {"S": s, "R": per_step // s, "EVEN": (k // block_values) % per_step == 0}


def matvec(
    x: torch.Tensor, weight: Weight, config: MatvecConfig | None = None, pdl: bool = False
) -> torch.Tensor:
    """x: [M, K] -> [M, N] float32 = x @ W.T, W dequantized in registers."""
    m, n, k = _check(x, weight)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    cfg = config or default_config(weight.qtype, n, k, m, x.device)
    launch(x, weight.qtype, weight.raw, out, cfg, pdl=pdl)
    return out


def matvec_rows(x: torch.Tensor, weight: Weight, pdl: bool = False) -> torch.Tensor:
    """x: [M, K] -> [M, N] float32: the one-row mat-vec once for each row of x (M launches, each
    with the tuned one-row config, writing its row of the output). Row i has the bits of
    matvec(x[i:i + 1]): a decode batch gives each sequence what it gets alone. Where M times
    the one-row kernel beats the kernels of M rows is kiln/kernels/linear.py's FLOAT_BATCH."""
    m, n, k = _check(x, weight)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    cfg = default_config(weight.qtype, n, k, 1, x.device)
    for i in range(m):
        launch(x[i : i + 1], weight.qtype, weight.raw, out[i : i + 1], cfg, pdl=pdl)
    return out


def _check(x: torch.Tensor, weight: Weight) -> tuple[int, int, int]:
    """(M, N, K) of a mat-vec of x [M, K] (contiguous, f32/f16/bf16, 1..MAX_M rows) with a 2-D
    weight of a mat-vec format on x's device, its blocks uint8 [N, row_bytes]."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be a contiguous [M, K]; got {x.shape}"
    assert x.dtype in _X_DTYPES, f"x must be f16/bf16/f32; got {x.dtype}"
    assert len(weight.shape) == 2, f"matvec needs a 2-D weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["matvec"], f"matvec does not support {weight.qtype.name}"
    m, k = x.shape
    n = weight.shape[0]
    assert k == weight.shape[1], f"x has K={k}, weight {weight.name} has K={weight.shape[1]}"
    assert 1 <= m <= MAX_M, f"matvec is for decode batches of 1..{MAX_M} rows; got M={m}"
    assert x.device == weight.device, f"x on {x.device}, weight on {weight.device}"
    raw = weight.raw
    assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride(1) == 1
    return m, n, k


def _slot_args(ids: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
    """(ids_ptr, stride_we, stride_xs, stride_os) of the kernels, in elements of each pointer's
    type (w: the view the kernel reads), and their SLOTS_PER_X. Slot s = t * k + j of ids
    [T, k] (contiguous) reads expert ids[t, j], x row s // SLOTS_PER_X and writes out row s:
    x [1, K] gives every slot row 0 (stride 0), x [T * k, K] slot s row s, both with
    SLOTS_PER_X = 1 (the T = 1 launches); x [T, K] gives token t's k slots row t (SLOTS_PER_X =
    k). Unused when EXPERTS is off."""
    if ids is None:
        return (None, 0, 0, 0), 1
    rows, slots = x.shape[0], ids.numel()
    if rows == 1:
        stride_xs, per_x = 0, 1
    elif rows == slots:
        stride_xs, per_x = x.stride(0), 1
    else:
        assert ids.dim() == 2 and rows == ids.shape[0], f"x has {rows} rows for ids {ids.shape}"
        stride_xs, per_x = x.stride(0), ids.shape[1]
    return (ids, w.stride(0), stride_xs, out.stride(0)), per_x


def launch(
    x: torch.Tensor,
    qtype: GGMLQuantizationType,
    raw: torch.Tensor,
    out: torch.Tensor,
    cfg: MatvecConfig,
    ids: torch.Tensor | None = None,
    pdl: bool = False,
) -> None:
    """The one launch of the mat-vec kernels, for callers that have checked their inputs.

    Plain (ids None): x [M, K], raw uint8 [N, row_bytes] -> out [M, N].
    Experts (kiln/kernels/moe.py): ids [T, k] contiguous on the device, raw uint8
    [n_expert, N, row_bytes], x [1, K] (one row for every slot), [T, K] (a token's k slots share
    its row) or [T * k, K] -> out [T * k, N]: slot s = t * k + j is the M = 1 mat-vec of its x
    row (_slot_args) with expert ids[t, j], in grid column s of the same kernels.
    """
    k = x.shape[1]
    n = raw.shape[-2]
    experts = ids is not None
    m = 1 if experts else x.shape[0]
    slots = ids.numel() if experts else 1
    block_values, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.shape[-1] == k // block_values * type_size, "raw row size does not match K"
    grid = (cdiv(n, cfg.block_n), slots)
    lanes = _WIDE[qtype] if qtype in SUPPORT["matvec_lanes"] else None
    if USE_WIDE and lanes is not None and m == 1 and _aligned(raw, lanes.view.itemsize):
        w = raw.view(lanes.view)
        slot_args, slots_per_x = _slot_args(ids, x, w, out)
        _k._matvec_lanes_m1_kernel[grid](
            x,
            w,
            out,
            n,
            k,
            w.stride(-2),
            *slot_args,
            _k._MAGIC.value,
            K_INTERP=k if _INTERPRETED else 0,
            EXPERTS=experts,
            SLOTS_PER_X=slots_per_x,
            BLOCK_N=cfg.block_n,
            FMT=lanes.fmt,
            **_lanes_tiling(k, qtype, cfg),
            num_warps=cfg.num_warps,
            **pdl_launch(pdl),
        )
        return
    if qtype in FLOAT_VIEW:
        w = raw.view(FLOAT_VIEW[qtype])  # [(n_expert,) N, K] typed view of the same bytes
        s, el = 1, cfg.tile_values
    elif block_values == 32:
        w = raw
        s, el = max(1, min(cfg.tile_values // 32, next_power_of_2(k // 32))), 32
    else:
        w = raw
        s, el = 8, 32
    slot_args, slots_per_x = _slot_args(ids, x, w, out)
    _k._matvec_kernel[grid](
        x,
        w,
        out,
        m,
        n,
        k,
        x.stride(0),
        w.stride(-2),
        out.stride(0),
        *slot_args,
        K_INTERP=k if _INTERPRETED else 0,
        EXPERTS=experts,
        SLOTS_PER_X=slots_per_x,
        FMT=FORMAT_IDS[qtype],
        M_PAD=next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        S=s,
        L=el,
        TYPE_SIZE=type_size,
        BLOCK_VALUES=block_values,
        num_warps=cfg.num_warps,
        **pdl_launch(pdl),
    )

"""Launcher of the int8-activation mat-vec (kernels/triton/matvec_q8.py): x in q8_1, the weight in
its GGUF blocks, dp4a dot products.

    matvec_q8(x: Q8_1 [M, K], weight: Weight [N, K]) -> [M, N] float32

M is a decode batch (1..8). Its reference is kiln.ops.reference.linear(q8_1.dequantize(x),
weight): the kernel's integer dot products are exact, so it differs from that only by the fp32
rounding of the block scales' products and the summation order. Against the bf16/f32 path the
difference is q8_1's own rounding of x (the quality gate of the norm_quant fusion).
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kiln.kernels import cdiv, interpreting, next_power_of_2, pdl_launch
from kiln.kernels.formats import FORMAT_IDS, SUPPORT
from kiln.kernels.matvec import MAX_M, MatvecConfig, _aligned, _lanes_tiling
from kiln.kernels.triton import matvec_q8 as _k
from kiln.quant.q8_1 import Q8_1
from kiln.weight import Weight

_T = GGMLQuantizationType

# The integer view each format is read through (rows must start on its items) and its lanes
# (threads) per block: kernels/triton/matvec_q8.py's top says what a lane reads.
VIEW = {
    _T.Q8_0: torch.int16,
    _T.Q4_0: torch.int16,
    _T.Q4_1: torch.int32,
    _T.Q5_0: torch.int16,
    _T.Q5_1: torch.int32,
    _T.Q4_K: torch.int64,
    _T.Q5_K: torch.int64,
    _T.Q6_K: torch.int16,
}
LANES = {
    _T.Q8_0: 4,
    _T.Q4_0: 4,
    _T.Q4_1: 4,
    _T.Q5_0: 4,
    _T.Q5_1: 4,
    _T.Q4_K: 8,
    _T.Q5_K: 8,
    _T.Q6_K: 8,
}


# Up to how many rows the bf16-activation mat-vec (tuned on the H100) is faster than this kernel
# at its default config, where it is: measured on an H100 (.base/sweep_q8.py, session 8, triton's
# do_bench, us per call, without the quantize launch that norm_quant folds into the norm; random
# weights): Q8_0 4096 x 4096 at M = 1 17.8 against 15.9 (M = 2: 20.1 against 22.4; M = 8: 46.0
# against 52.4). Everything else measured wins at every M: Q4_K 24576 x 4096 31.7 / 48.2 / 191.2
# against 41.3 / 107.7 / 473.2 at M = 1 / 2 / 8 (4096 x 4096: 10.8 / 13.8 / 37.2 against 12.3 /
# 27.8 / 89.3), Q6_K 4096 x 12288 33.3 / 39.5 / 118.9 against 37.8 / 78.1 / 162.6. Q4_0, Q4_1,
# Q5_0, Q5_1 and Q5_K are not timed (sm_90 K loop at M = 1, instructions a weight value: Q4_0
# 2.3, Q5_0 3.5, Q5_K 3.5 against the bf16 kernel's 4.6, 8.2 and its byte kernel for Q5_K).
BF16_FASTER_UP_TO = {_T.Q8_0: 1}


def reads(weight: Weight, m: int = 1) -> bool:
    """Whether the int8 mat-vec reads this weight at M rows: a format of SUPPORT["matvec_q8"],
    2-D (or an expert stack [n_expert, N, K]: expert_matvec_q8, M = 1 a slot), its rows aligned
    to the format's integer view, and M past BF16_FASTER_UP_TO."""
    return (
        len(weight.shape) in (2, 3)
        and weight.raw is not None
        and weight.qtype in SUPPORT["matvec_q8"]
        and _aligned(weight.raw, VIEW[weight.qtype].itemsize)
        and m > BF16_FASTER_UP_TO.get(weight.qtype, 0)
    )


def default_config(m: int) -> MatvecConfig:
    """One x row: 8 weight rows a program, 4 warps, 4096 values a step: for every format one
    lane per thread or more (Q4_K and Q6_K at 2048 left half the threads without a lane of
    their own, and the sm_90 K loop then moved x through shared memory: Q4_K 4.6 and Q6_K 6.0
    instructions a weight value at M = 1 against 2.6 and 3.5 at 4096).
    2..8 rows: 16 weight rows a program, 1024 values a step, 4 warps: each x word a lane loads
    serves 16 weight rows, not 2..4 (the x loads, M per weight word, had bound the kernel). The
    fastest of `benchmarks/batched_linear.py --sweep` (16 configs, block_n 2..16, 1024 or 4096
    values, 4 or 8 warps; H100, session 11) at M = 4 and 8 on qwen3-8b's 24576 x 4096 Q4_K
    (us: 43.1 / 70.5 against the old default's 93.8 / 188.7; 6144 x 4096 13.0 / 22.3 with 8
    rows at M = 8 against 25.9 / 49.1; Q6_K 4096 x 12288 35.1 / 46.3 against 59.3 / 115.0, its
    best 8 rows at M = 4 and 8 warps at M = 8)."""
    if m == 1:
        return MatvecConfig(block_n=8, tile_values=4096, num_warps=4)
    return MatvecConfig(block_n=16, tile_values=1024, num_warps=4)


def matvec_q8(
    x: Q8_1, weight: Weight, config: MatvecConfig | None = None, pdl: bool = False
) -> torch.Tensor:
    """x: q8_1 [M, K] -> [M, N] float32 = dequantize(x) @ W.T."""
    m, n = check_dense_input(x, weight, "matvec_q8")
    assert 1 <= m <= MAX_M, f"matvec_q8 is for decode batches of 1..{MAX_M} rows; got M={m}"
    w = _integer_view(weight)
    out = torch.empty((m, n), dtype=torch.float32, device=x.qs.device)
    launch(x, weight.qtype, w, out, config or default_config(m), pdl=pdl)
    return out


def check_dense_input(x: Q8_1, weight: Weight, kernel: str) -> tuple[int, int]:
    """The checks an int8 kernel (`kernel`: its SUPPORT key and its name in the messages) makes
    of q8_1 rows x [M, K] and a 2-D weight [N, K] -> (M, N)."""
    x.check()
    m, k = x.shape
    assert len(weight.shape) == 2, f"{kernel} needs a 2-D weight; got {weight.shape}"
    assert weight.qtype in SUPPORT[kernel], f"{kernel} does not read {weight.qtype.name}"
    assert k == weight.shape[1], f"x has K={k}, weight {weight.name} has K={weight.shape[1]}"
    assert x.qs.device == weight.device, f"x on {x.qs.device}, weight on {weight.device}"
    return m, weight.shape[0]


def _integer_view(weight: Weight) -> torch.Tensor:
    """The weight's blocks (uint8 [N, row_bytes] or [n_expert, N, row_bytes]) through the
    integer view its format is read with (VIEW), checked: unit stride along a row, every row
    and expert start on the view's items."""
    raw = weight.raw
    assert raw.dtype == torch.uint8 and raw.dim() == len(weight.shape) and raw.stride(-1) == 1, (
        f"weight {weight.name}: raw must be uint8 {list(weight.shape[:-1])} x row bytes with "
        "unit stride along a row"
    )
    view = VIEW[weight.qtype]
    assert _aligned(raw, view.itemsize), (
        f"weight {weight.name}: rows must start on {view.itemsize}-byte boundaries"
    )
    return raw.view(view)


def expert_matvec_q8(
    x: Q8_1,
    ids: torch.Tensor,
    weight: Weight,
    config: MatvecConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """The MoE decode mat-vec on q8_1 rows (kiln/kernels/moe.py's expert_linear, int8): x [T, K]
    (a token's k slots read its row) or [T * k, K] (a row per slot), ids [T, k] -> [T * k, N]
    float32, row t * k + j = dequantize(x)[t or t * k + j] @ W[ids[t, j]].T. ids must lie in
    [0, n_expert): they are read on the device and not checked."""
    x.check()
    rows, k = x.shape
    assert ids.dim() == 2 and ids.dtype in (torch.int32, torch.int64) and ids.is_contiguous(), (
        f"ids must be a contiguous [T, k] int32/int64 tensor; got {ids.dtype} {tuple(ids.shape)}"
    )
    assert len(weight.shape) == 3, f"need a [n_expert, N, K] weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["matvec_q8"], f"matvec_q8 does not read {weight.qtype.name}"
    t, used = ids.shape
    slots = t * used
    _e, n, wk = weight.shape
    assert k == wk, f"x has K={k}, weight {weight.name} has K={wk}"
    assert rows in (t, slots), (
        f"x must have one row per token ({t}) or one per slot ({t}*{used}={slots}); got {rows}"
    )
    assert x.qs.device == weight.device == ids.device, (
        f"x on {x.qs.device}, ids on {ids.device}, weight on {weight.device}"
    )
    w = _integer_view(weight)
    out = torch.empty((slots, n), dtype=torch.float32, device=x.qs.device)
    if slots:
        per_x = used if rows == t and used > 1 else 1
        launch(x, weight.qtype, w, out, config or default_config(1), pdl, ids, per_x)
    return out


def launch(
    x: Q8_1,
    qtype: GGMLQuantizationType,
    w: torch.Tensor,
    out: torch.Tensor,
    cfg: MatvecConfig,
    pdl: bool = False,
    ids: torch.Tensor | None = None,
    slots_per_x: int = 1,
) -> None:
    """One launch for checked inputs: w is the weight's integer view [N, row_bytes / item], or
    with ids [T, k] an expert stack [n_expert, N, row_bytes / item] (one M = 1 program column
    a slot; x row s // slots_per_x for slot s)."""
    experts = ids is not None
    m, k = (1, x.shape[1]) if experts else x.shape
    n = w.shape[-2]
    grid = (cdiv(n, cfg.block_n), ids.numel() if experts else 1)
    _k._matvec_q8_kernel[grid](
        x.qs.view(torch.int32),
        x.ds,
        w,
        out,
        m,
        n,
        k,
        w.stride(-2),
        out.stride(0),
        ids,
        w.stride(0) if experts else 0,
        K_INTERP=k if interpreting() else 0,
        EXPERTS=experts,
        SLOTS_PER_X=slots_per_x,
        M_PAD=next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        **_lanes_tiling(k, qtype, cfg, LANES[qtype]),
        FMT=FORMAT_IDS[qtype],
        WPB=GGML_QUANT_SIZES[qtype][1] // w.element_size(),
        DP4A=not interpreting(),
        num_warps=cfg.num_warps,
        **pdl_launch(pdl),
    )

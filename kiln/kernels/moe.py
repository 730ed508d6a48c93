"""Launchers of the MoE expert mat-muls: the decode mat-vec (expert_linear: each token's experts,
one launch) and the grouped GEMM of prompts (grouped_expert_linear over a GroupedPlan: the slots
sorted by expert on the device, one launch per weight; kernels/triton/moe.py).

    expert_linear(x: [T, K] or [T * k, K] f16/bf16/f32 contiguous, ids: int32/int64 [T, k]
                  contiguous on the device, weight: Weight [n_expert, N, K]) -> [T * k, N] float32

Row s = t * k + j is x[t] @ W[ids[t, j]].T when x has T rows (gate/up: a token's k slots read
its row) or x[s] @ W[ids[t, j]].T when x has T * k rows (down: each slot reads its own SwiGLU
row); with k = 1 the two agree. The kernels are the decode mat-vec's
(kiln/kernels/triton/matvec.py with EXPERTS on): grid axis 1 runs over the T * k slots and each
program reads its expert id on the device, so nothing waits for the router on the host and the
launch can be captured in a CUDA graph. At T = 1 the kernels are the one-token launches' exactly
(SLOTS_PER_X = 1). A merged gate/up weight [n_expert, 2F, K] is just N = 2F. Its reference is
kiln.ops.reference.expert_linear.

ids must lie in [0, n_expert): they are read on the device and not checked (an out-of-range id
reads outside the weight).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from kiln.kernels import CONFIG_DIR, cdiv, config_name, interpreting, next_power_of_2, pdl_launch
from kiln.kernels import matmul as _mm
from kiln.kernels import matvec as _mv
from kiln.kernels.formats import SUPPORT
from kiln.kernels.triton import moe as _k
from kiln.weight import Weight

_ID_DTYPES = (torch.int32, torch.int64)
# Slots run on grid axis 1, which CUDA limits to 65535 programs.
MAX_SLOTS = 65535


def default_config(weight: Weight, slots: int) -> _mv.MatvecConfig:
    """Each slot is an M = 1 mat-vec of one expert: the config tuned for this expert shape and
    number of slots (T * k; scripts/tune_matvec.py, e.g. "1536x2048x8"), else the M = 1
    defaults."""
    _e, n, k = weight.shape
    return _mv.default_config(weight.qtype, n, k, 1, weight.device, slots=slots)


def expert_linear(
    x: torch.Tensor,
    ids: torch.Tensor,
    weight: Weight,
    config: _mv.MatvecConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """x: [T, K] or [T * k, K]; ids: [T, k] -> [T * k, N] float32, row t * k + j =
    x[t or t * k + j] @ W[ids[t, j]].T."""
    assert x.dim() == 2 and x.is_contiguous(), (
        f"x must be a contiguous [T or T*k, K]; got {tuple(x.shape)}"
    )
    assert x.dtype in _mv._X_DTYPES, f"x must be f16/bf16/f32; got {x.dtype}"
    assert ids.dim() == 2 and ids.dtype in _ID_DTYPES, (
        f"ids must be a [T, k] int32/int64 tensor of expert ids; got {ids.dtype} {tuple(ids.shape)}"
    )
    assert ids.is_contiguous(), f"ids must be contiguous; got strides {ids.stride()}"
    assert len(weight.shape) == 3, f"need a [n_expert, N, K] weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["expert_linear"], (
        f"expert_linear does not support {weight.qtype.name}"
    )
    t, used = ids.shape
    slots = t * used
    _e, n, k = weight.shape
    assert x.shape[1] == k, f"x has K={x.shape[1]}, weight {weight.name} has K={k}"
    assert x.shape[0] in (t, slots), (
        f"x must have one row per token ({t}: every expert of a token reads it) or one per slot "
        f"({t}*{used}={slots}); got {x.shape[0]}"
    )
    assert slots <= MAX_SLOTS, f"expert_linear launches at most {MAX_SLOTS} slots; got {slots}"
    assert x.device == weight.device == ids.device, (
        f"x on {x.device}, ids on {ids.device}, weight on {weight.device}"
    )
    raw = weight.raw
    assert raw is not None and raw.dtype == torch.uint8 and raw.dim() == 3 and raw.stride(2) == 1, (
        f"weight {weight.name}: raw must be uint8 [n_expert, N, row_bytes] with unit last stride"
    )
    out = torch.empty((slots, n), dtype=torch.float32, device=x.device)
    if slots == 0:
        return out
    cfg = config or default_config(weight, slots)
    _mv.launch(x, weight.qtype, raw, out, cfg, ids=ids, pdl=pdl)
    return out


# -- prompts: the grouped GEMM ------------------------------------------------------------------
# Below this many tokens a MoE layer runs the per-token expert mat-vecs (expert_linear); from it
# on, the grouped GEMM. Builtin: the first row count past the dense mat-vec's (matvec.MAX_M); a
# GPU's measured threshold, with its evidence, replaces it (grouped_min_tokens).
GROUPED_MIN_TOKENS = _mv.MAX_M + 1


@functools.cache
def _measured_min_tokens(device_name: str) -> int | None:
    path = CONFIG_DIR / config_name("moe", device_name)
    if not path.exists():
        return None
    entry = json.loads(path.read_text())["grouped_min_tokens"]
    assert "evidence" in entry, f"{path}: grouped_min_tokens needs its evidence"
    return int(entry["value"])


def grouped_min_tokens(device: torch.device) -> int:
    """The token count from which MoE layers run the grouped GEMM on this device: the measured
    one of kernels/configs/moe,device=<gpu>.json ({"grouped_min_tokens": {"value": N,
    "evidence": "the numbers and the command"}}), else GROUPED_MIN_TOKENS."""
    if device.type == "cuda":
        measured = _measured_min_tokens(torch.cuda.get_device_name(device))
        if measured is not None:
            return measured
    return GROUPED_MIN_TOKENS


def grouped_reads(weight: Weight) -> bool:
    """Whether the grouped GEMM reads this expert stack: a format of the GEMM, its own blocks."""
    return len(weight.shape) == 3 and weight.qtype in SUPPORT["matmul"] and weight.raw is not None


@dataclass(frozen=True)
class GroupedPlan:
    """The slots of ids [T, k] sorted by expert, each expert's run padded to whole blocks of
    block_m, made on the device (no host synchronization: its sizes follow from T, k, the
    number of experts and block_m only).

    sorted_slots: int32 [n_blocks * block_m], the slot ids (t * k + j) of expert 0's tokens,
                  then expert 1's, ..., each run padded with n_slots; n_slots past the last run.
    block_expert: int32 [n_blocks], the expert of each block, -1 for blocks past the last run.
    """

    sorted_slots: torch.Tensor
    block_expert: torch.Tensor
    n_slots: int
    k: int  # experts per token
    n_expert: int
    block_m: int


def block_m_for(n_slots: int, n_expert: int) -> int:
    """The rows of a block, from the tokens each expert gets on average (not the batch): the
    next power of two of n_slots / n_expert, 16..128 (wgmma's smallest tile up to the dense
    GEMM's mid-size one)."""
    per_expert = -(-n_slots // max(1, n_expert))
    return max(16, min(128, next_power_of_2(per_expert)))


def plan(ids: torch.Tensor, n_expert: int, block_m: int | None = None) -> GroupedPlan:
    """ids: int [T, k] of experts in [0, n_expert) -> the GroupedPlan of its slots (torch ops on
    the device, graph-capturable)."""
    assert ids.dim() == 2 and ids.dtype in _ID_DTYPES, f"ids must be int [T, k]; got {ids.shape}"
    t, k = ids.shape
    n_slots = t * k
    bm = block_m or block_m_for(n_slots, n_expert)
    assert bm >= 16 and bm & (bm - 1) == 0, f"block_m must be a power of two >= 16; got {bm}"
    dev = ids.device
    flat = ids.reshape(-1).long()
    counts = torch.zeros(n_expert, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    ends = torch.cumsum(padded, 0)
    starts = ends - padded  # each expert's first row in the sorted layout
    order = torch.argsort(flat, stable=True)  # slots by expert, in slot order within one
    expert_of = flat[order]
    first_unpadded = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_slots, device=dev) - first_unpadded[expert_of]
    # The padded layout's size bound: every expert's run rounded up, at most bm - 1 rows each.
    n_blocks = -(-(n_slots + n_expert * (bm - 1)) // bm)
    sorted_slots = torch.full((n_blocks * bm,), n_slots, dtype=torch.int32, device=dev)
    sorted_slots[starts[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(n_blocks, device=dev) * bm
    expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < ends[-1], expert, -1).to(torch.int32)
    return GroupedPlan(sorted_slots, block_expert, n_slots, k, n_expert, bm)


def grouped_config(block_m: int) -> _mm.MatmulConfig:
    """The grouped GEMM's tile for a block of block_m slots: the weight from registers (128
    weight rows, BLOCK_K 64); 8 warps for 128-slot blocks (a 128 x 128 accumulator), else 4."""
    return _mm.MatmulConfig(block_m, 128, 64, 1, 8 if block_m >= 128 else 4, 3)


def grouped_expert_linear(
    x: torch.Tensor,
    grouped: GroupedPlan,
    weight: Weight,
    only_expert: int = -1,
    out: torch.Tensor | None = None,
    pdl: bool = False,
    config: _mm.MatmulConfig | None = None,
) -> torch.Tensor:
    """x: [T, K] (every expert of token t reads row t: gate/up) or [T * k, K] (slot s reads row
    s: down) -> [T * k, N] float32 in slot order, row t * k + j = x[t or s] @ W[ids[t, j]].T,
    as kiln.ops.reference.expert_linear, with x and the weight in bf16 (the dense GEMM's
    arithmetic). only_expert >= 0 computes only that expert's rows into `out` (the unfused
    form: one launch per expert over the same plan). config: the tile (default
    grouped_config(block_m)); its block_m must be the plan's; quants=True runs the quant
    domain (kernels/matmul.py)."""
    assert x.dim() == 2, f"x must be a [T or T*k, K]; got {tuple(x.shape)}"
    assert len(weight.shape) == 3, f"need a [n_expert, N, K] weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["matmul"], f"the grouped GEMM does not read {weight.qtype.name}"
    n_expert, n, k = weight.shape
    assert n_expert == grouped.n_expert, f"plan for {grouped.n_expert} experts, weight {n_expert}"
    slots = grouped.n_slots
    assert x.shape[1] == k, f"x has K={x.shape[1]}, weight {weight.name} has K={k}"
    assert x.shape[0] in (slots // grouped.k, slots), (
        f"x must have one row per token ({slots // grouped.k}) or per slot ({slots}); "
        f"got {x.shape[0]}"
    )
    raw = weight.raw
    assert raw is not None and raw.dim() == 3 and raw.stride(2) == 1, (
        f"weight {weight.name}: raw must be uint8 [n_expert, N, row_bytes] with unit last stride"
    )
    if out is None:
        out = torch.empty((slots, n), dtype=torch.float32, device=x.device)
    if slots == 0 or n == 0:
        return out
    cfg = config or grouped_config(grouped.block_m)
    assert cfg.block_m == grouped.block_m, f"config block_m {cfg.block_m}, plan {grouped.block_m}"
    if cfg.quants:
        xb, xs, group = _mm._quants_x(x, weight.qtype, cfg, exact=False)
    else:
        xb = _mm._bf16(x)
        xs, group = xb, 32
    w = _mm._weight_view(weight)
    per_x = grouped.k if x.shape[0] * grouped.k == slots and grouped.k > 1 else 1
    grid = (grouped.block_expert.shape[0], cdiv(n, cfg.block_n))
    _k._grouped_matmul_kernel[grid](
        xb,
        xs,
        w,
        out,
        grouped.sorted_slots,
        grouped.block_expert,
        n,
        k,
        slots,
        only_expert,
        xb.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        K_INTERP=k if interpreting() else 0,
        SLOTS_PER_X=per_x,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        **_mm._tile_args(weight.qtype, k, cfg.block_k),
        AHEAD=cfg.ahead,
        QUANTS=cfg.quants,
        GROUP_VALUES=group,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(pdl),
    )
    return out


def per_expert_linear(
    x: torch.Tensor,
    grouped: GroupedPlan,
    weight: Weight,
    pdl: bool = False,
    config: _mm.MatmulConfig | None = None,
) -> torch.Tensor:
    """The unfused form of grouped_expert_linear: one launch per expert over the same plan
    (the same tiles and arithmetic, so the same bits)."""
    out = torch.empty((grouped.n_slots, weight.shape[1]), dtype=torch.float32, device=x.device)
    for e in range(grouped.n_expert):
        grouped_expert_linear(x, grouped, weight, e, out, pdl, config)
    return out

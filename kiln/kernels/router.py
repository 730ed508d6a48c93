"""Launchers of the MoE decode routing and combine kernels (kernels/triton/router.py).

    route_topk(logits: f32 [T, E], n_used, normalize) -> (weights f32 [T, k], ids int64 [T, k])
        = kiln.ops.reference.moe_select: softmax over the experts, top-k (k = n_used,
          descending), weights renormalized to sum to 1 when normalize. One program per row.
    combine(down: f32 [T * k, N], weights: f32 [T, k]) -> f32 [T, N]
        = kiln.ops.reference.moe_combine: row t = sum_j weights[t, j] * down[t * k + j], in slot
          order (down: kiln.kernels.moe.expert_linear's rows, token t's k slots consecutive).

One launch each, launch parameters from shapes only (CUDA-graph safe). ids are int64 like
torch.topk's; kiln.kernels.moe.expert_linear reads them on the device as they are.

Ties: torch.topk does not specify which of equal probabilities comes first (its CPU and CUDA
kernels differ); route_topk takes the lowest expert index. Probabilities are compared, as
torch does, so logits a few ulp apart whose probabilities round to the same fp32 value tie too.
"""

from __future__ import annotations

import torch

from kiln.kernels import cdiv, next_power_of_2, pdl_launch
from kiln.kernels.triton import router as _k

# One program holds all E logits in registers: 1024 fp32 over 4 warps is 8 per thread. Real MoE
# models have 8..256 experts (qwen3-30b-a3b: 128, k = 8).
MAX_E = 1024
# Columns per combine program: 256 fp32 over 2 warps is 4 per thread, one 16-byte load per slot
# row; n_embd = 2048 gives 8 programs, each with its k row loads in flight at once. Untuned.
BLOCK_N = 256
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._route_topk_kernel).__name__ == "InterpretedFunction"


def route_topk(
    logits: torch.Tensor, n_used: int, normalize: bool, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: f32 [T, E] -> (weights f32 [T, k], ids int64 [T, k]), both contiguous, k =
    n_used: each row's k most probable experts."""
    assert logits.dim() == 2, f"router logits must be [T, n_expert]; got {tuple(logits.shape)}"
    assert logits.dtype == torch.float32, f"router logits must be float32; got {logits.dtype}"
    assert logits.stride(1) == 1 or logits.shape[1] == 1, (
        f"router logits need a contiguous last dim; got strides {logits.stride()}"
    )
    t, e = logits.shape
    k = n_used
    assert 1 <= e <= MAX_E, f"route_topk handles 1..{MAX_E} experts; got {e}"
    assert 1 <= k <= e, f"need 1 <= k <= n_expert ({e}); got k={k}"
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    block_e = next_power_of_2(e)
    # Every step is a reduction over E (2 for the softmax, 1 per round): within one warp they
    # are shuffles only; more warps would add a shared-memory exchange and barrier to each.
    _k._route_topk_kernel[(t,)](
        logits,
        weights,
        ids,
        e,
        logits.stride(0),
        K=k,
        BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(k),
        NORMALIZE=bool(normalize),
        num_warps=max(1, block_e // 256),
        **pdl_launch(pdl),
    )
    return weights, ids


def combine(down: torch.Tensor, weights: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """down: f32 [T * k, N] (row t * k + j: the output of token t's slot j); weights: f32 [T, k]
    -> f32 [T, N], row t = sum_j weights[t, j] * down[t * k + j]."""
    assert down.dim() == 2 and down.dtype == torch.float32, (
        f"down must be a float32 [T*k, N]; got {down.dtype} {tuple(down.shape)}"
    )
    assert down.stride(1) == 1 or down.shape[1] == 1, (
        f"down needs a contiguous last dim (any row stride); got strides {down.stride()}"
    )
    assert weights.dim() == 2 and weights.dtype == torch.float32, (
        f"weights must be a float32 [T, k]; got {weights.dtype} {tuple(weights.shape)}"
    )
    t, k = weights.shape
    n = down.shape[1]
    assert down.shape[0] == t * k, (
        f"down must have T*k = {t}*{k} = {t * k} rows (weights {tuple(weights.shape)}); "
        f"got {down.shape[0]}"
    )
    assert down.device == weights.device, f"down on {down.device}, weights on {weights.device}"
    out = torch.empty((t, n), dtype=torch.float32, device=down.device)
    if n == 0 or t == 0:
        return out
    if k == 0:
        return out.zero_()
    block = min(BLOCK_N, next_power_of_2(n))
    # Tokens on grid axis 0 (no 65535 limit), column blocks on axis 1.
    _k._moe_combine_kernel[(t, cdiv(n, block))](
        down,
        weights,
        out,
        n,
        down.stride(0),
        weights.stride(0),
        weights.stride(1),
        K=k,
        BLOCK_N=block,
        num_warps=max(1, min(2, block // 128)),
        **pdl_launch(pdl),
    )
    return out

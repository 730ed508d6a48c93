"""MoE decode routing and combine, one launch each (the torch forms are ~8 and 2 launches: ~20 us
per layer measured on an H100 for qwen3-30b-a3b, ~1 ms of a 5 ms token over 48 layers).

_route_topk_kernel: one program per token row. Softmax over the E experts in fp32
(max-subtracted, as torch), then K rounds of argmax over the probabilities, each masking out the
expert it chose: the K largest in descending order, as torch.topk(sorted=True) gives them. Ties
go to the lowest index (torch.topk does not specify the order of equal values). The weights are
the chosen probabilities, renormalized to sum to 1 when NORMALIZE.

_moe_combine_kernel: out[t, n] = sum_j w[t, j] * down[t * K + j, n], fp32, summed in slot order
j = 0..K-1 like torch's (down.reshape(T, K, N) * w[:, :, None]).sum(1); program (t, c) owns
BLOCK_N columns of token t.

Only @triton.jit functions live here; kiln/kernels/router.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _route_topk_kernel(
    logits_ptr,  # f32 [T, E], row stride stride_l, unit stride along E
    w_ptr,  # f32 [T, K] contiguous: the chosen probabilities, descending
    ids_ptr,  # int64 [T, K] contiguous: their expert ids
    E,
    stride_l,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_K: tl.constexpr,  # next power of two >= K
    NORMALIZE: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=-float("inf"))
    x = x.to(tl.float32)
    ex = tl.where(valid, tl.exp(x - tl.max(x, axis=0)), 0.0)
    p = ex / tl.sum(ex, axis=0)  # [BLOCK_E]: probabilities, 0 <= p <= 1
    # Lanes past E and lanes already chosen hold -1: below every probability (even a 0 from a
    # -inf logit), so a round never picks them while an unchosen expert is left (K <= E).
    cand = tl.where(valid, p, -1.0)
    slots = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for s in tl.static_range(K):
        best, idx = tl.max(cand, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # NaN logits make every p NaN and the argmax undefined: keep the id in range so the
        # expert mat-vecs that read it on the device never index past the weight.
        idx = tl.minimum(idx, E - 1)
        w = tl.where(slots == s, best, w)
        ids = tl.where(slots == s, idx, ids)
        cand = tl.where(offs == idx, -1.0, cand)
    if NORMALIZE:
        w = w / tl.sum(tl.where(slots < K, w, 0.0), axis=0)
    out = row * K + slots
    tl.store(w_ptr + out, w, mask=slots < K)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=slots < K)


@triton.jit
def _moe_combine_kernel(
    down_ptr,  # f32 [T * K, N], row stride stride_d, unit stride along N
    w_ptr,  # f32 [T, K], strides stride_wt, stride_w
    out_ptr,  # f32 [T, N] contiguous
    N,
    stride_d,
    stride_wt,
    stride_w,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    t = tl.program_id(0).to(tl.int64)  # 64-bit: T * K * N may exceed 2**31 (long prompts)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    down_ptr += t * K * stride_d  # token t's K slot rows
    w_ptr += t * stride_wt
    out_ptr += t * N
    # Unrolled over the K slots: the K row loads are independent and issued together; the sum
    # is one product and one add per slot in slot order, as torch's sum over the slots (the GPU may
    # fuse a product and its add into one FMA: one rounding fewer).
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(K):
        ws = tl.load(w_ptr + s * stride_w)
        d = tl.load(down_ptr + s * stride_d + cols, mask=mask, other=0.0)
        acc += ws * d
    tl.store(out_ptr + cols, acc, mask=mask)

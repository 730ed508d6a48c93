"""The grouped GEMM of MoE prompts: every expert's rows of one weight in one launch.

The tokens' expert slots come sorted by expert and padded to whole BLOCK_M blocks
(kiln/kernels/moe.py's GroupedPlan: `sorted_slots`, each block's expert in `block_expert`, -1 for
the unused blocks past the last expert). Program (b, j) owns block b of the sorted slots and
weight rows j * BLOCK_N..: it reads its expert id on the device, gathers the x rows of its slots
(slot s = t * k + i reads x row s // SLOTS_PER_X: a token's row for gate/up, the slot's own row
for down), walks K as the dense GEMM does (kernels/triton/matmul.py: the weight tile dequantized
in registers to bf16, tensor cores with fp32 accumulation, the weight as the left operand; or in
the quant domain, QUANTS, with the group sums of the x rows gathered alike) and
writes each slot's output row in slot order, so the result is the per-slot layout of
kiln.ops.reference.expert_linear and the combine that follows sums a token's k rows in a fixed
order: no atomics, the same bits at every SM count.

Only @triton.jit functions live here; kiln/kernels/moe.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.matmul import _k_loop, _k_loop_quants
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _grouped_matmul_kernel(
    x_ptr,  # bf16 [rows, K], row stride stride_xm, unit stride along K
    xs_ptr,  # QUANTS: fp32 [rows, K // GROUP_VALUES] group sums of x; else unused
    w_ptr,  # uint8 [n_expert, N, row_bytes] (float formats: typed [n_expert, N, K])
    out_ptr,  # f32 [n_slots, N], row stride stride_om
    sorted_ptr,  # int32 [n_blocks * BLOCK_M]: slots sorted by expert; n_slots marks padding
    block_expert_ptr,  # int32 [n_blocks]: each block's expert, -1 past the last one
    N,
    K,
    n_slots,
    only_expert,  # -1: every block; else only the blocks of this expert (the unfused form)
    stride_xm,
    stride_we,  # in elements of w_ptr's type
    stride_wn,
    stride_om,
    K_INTERP: tl.constexpr,  # K as a constexpr under TRITON_INTERPRET, else 0 (matmul.py)
    SLOTS_PER_X: tl.constexpr,  # slots that read one x row: k (gate/up) or 1 (down)
    FMT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PDL: tl.constexpr = False,
    AHEAD: tl.constexpr = False,  # weight loads issued a step early (matmul.py _k_loop)
    QUANTS: tl.constexpr = False,  # the quant domain (matmul.py _k_loop_quants)
    GROUP_VALUES: tl.constexpr = 32,  # QUANTS: values a group (Q6_K 16)
):
    if PDL:
        wait_for_inputs()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if (expert >= 0) & ((only_expert < 0) | (expert == only_expert)):
        slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
        slot_ok = slots < n_slots
        x_row = tl.where(slot_ok, slots // SLOTS_PER_X, 0).to(tl.int64)
        x_rows = x_ptr + x_row[:, None] * stride_xm  # [BLOCK_M, 1]
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        w_rows = w_base + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T: the weight rows lead
        if QUANTS:
            xs_rows = xs_ptr + x_row * (K // GROUP_VALUES)  # [BLOCK_M]
            acc = _k_loop_quants(
                acc, x_rows, xs_rows, w_rows, 0, K, K, 0, K_INTERP, FMT, BLOCK_K, TYPE_SIZE,
                GROUP_VALUES, EVEN_K, INTERPRETED, False,
            )  # fmt: skip
        else:
            acc = _k_loop(
                acc, x_rows, w_rows, 0, K, K, K_INTERP, FMT, BLOCK_N, BLOCK_K, TYPE_SIZE,
                BLOCK_VALUES, EVEN_K, INTERPRETED, False, True, AHEAD,
            )  # fmt: skip
        out = out_ptr + slots.to(tl.int64)[None, :] * stride_om + rn[:, None]
        tl.store(out, acc, mask=slot_ok[None, :] & (rn[:, None] < N))

"""Mutation check: plant small, plausible bugs in the kernels, the reference ops and the sampler,
one at a time, and run the tests that cover each; every bug must make them fail.

Each mutation in MUTATIONS names a file, the exact snippets it changes (each must occur once:
a stale snippet is an error, not a pass) and the pytest arguments of the tests that cover it.
The work happens in a temporary copy of kiln/, tests/ and pyproject.toml (the checkout is never
touched), with ../shared linked beside it so that the fixtures find the real files. The copy's
covering tests are first run without any mutation (they must pass: otherwise a "killed" means
nothing), then each mutation is applied, its tests run with `pytest -x -q`, and the file put
back.

    python scripts/mutate.py                  # all of them; exit 1 if any survives
    python scripts/mutate.py --list           # names, files, tests
    python scripts/mutate.py --only norm_eps --only sampler_temperature_first

A survivor means the tests cannot tell the planted bug from the real code: strengthen the tests
(docs/testing.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("kiln", "tests", "pyproject.toml")
TIMEOUT_S = 1200  # one mutation's test run; a hang counts as caught (reported as a timeout)


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (original snippet, replacement), each original once
    tests: tuple[str, ...]  # pytest arguments: files and node ids, at most one "-k", EXPR
    bug: str  # what the planted bug is, in words


def _one(original: str, replacement: str) -> tuple[tuple[str, str], ...]:
    return ((original, replacement),)


# Test selections (pytest arguments). Kernel tests without the sm_90 compile checks: those run
# the real compiler and say nothing about the numbers.
NOT_SM90 = ("-k", "not sm90")
NORM_TESTS = ("tests/kernels/test_norm.py", "tests/kernels/test_rope.py", *NOT_SM90)
ROPE_TESTS = ("tests/kernels/test_rope.py", *NOT_SM90)
ACTIVATION_TESTS = ("tests/kernels/test_activation.py", *NOT_SM90)
ATTENTION_TESTS = ("tests/kernels/test_attention.py", *NOT_SM90)
FLASH_TESTS = ("tests/kernels/test_flash_attention.py", *NOT_SM90)
MATVEC_TESTS = ("tests/kernels/test_matvec.py", *NOT_SM90)
# (scripts/ is not in the mutation copy: the tuning script's test stays out)
MATMUL_TESTS = ("tests/kernels/test_matmul.py", "-k", "not sm90 and not tune_script")
MOE_TESTS = ("tests/kernels/test_moe.py", *NOT_SM90)
Q8_TESTS = ("tests/kernels/test_matvec_q8.py", *NOT_SM90)
MMQ_TESTS = ("tests/kernels/test_matmul_q8.py", *NOT_SM90)
GROUPED_TESTS = ("tests/kernels/test_moe_grouped.py", *NOT_SM90)
ROUTER_TESTS = ("tests/kernels/test_router.py", *NOT_SM90)
EMBEDDING_TESTS = ("tests/kernels/test_embedding.py", *NOT_SM90)
SAMPLER_TESTS = ("tests/runtime/test_sampler.py",)
HF = "tests/models/test_hf_reference.py"
HF_LLAMA = (f"{HF}::test_synthetic_models[tiny-llama-q8_0]", f"{HF}::test_stories260k")
HF_QWEN2 = (f"{HF}::test_synthetic_models[tiny-qwen2-f16]",)
HF_QWEN3 = (f"{HF}::test_synthetic_models[tiny-qwen3-q6_k]",)
HF_QWEN3MOE = (f"{HF}::test_synthetic_models[tiny-qwen3moe-q8_0]",)
HF_LLAMA3 = (f"{HF}::test_llama3_rope_factors",)

KERNELS = "kiln/kernels/triton/"
REFERENCE = "kiln/ops/reference.py"
SAMPLER = "kiln/runtime/sampler.py"

MUTATIONS: list[Mutation] = [
    # -- the kernels (kiln/kernels/triton/*.py), run in Triton's interpreter on the CPU ---------
    Mutation(
        "norm_eps",
        KERNELS + "norm.py",
        _one(
            "return tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)",
            "return tl.rsqrt(tl.sum(x * x, axis=0) / n)",
        ),
        NORM_TESTS,
        "RMSNorm without eps (rms_norm, add_rms_norm, qk_norm and qkv_norm_rope share it)",
    ),
    Mutation(
        "norm_add_residual",
        KERNELS + "norm.py",
        _one("h = r + x  # reference: residual + x", "h = x"),
        ("tests/kernels/test_norm.py", *NOT_SM90),
        "add_rms_norm drops the residual stream",
    ),
    Mutation(
        "rope_sin_sign",
        KERNELS + "rope.py",
        _one("sin = tl.where(first, -sin, sin)", "sin = tl.where(first, sin, -sin)"),
        ROPE_TESTS,
        "RoPE rotates the wrong way",
    ),
    Mutation(
        "cache_bf16_truncates",
        KERNELS + "rope.py",
        _one("bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits"),
        ROPE_TESTS,
        "the bf16 K/V cache write truncates instead of rounding to nearest even",
    ),
    Mutation(
        "cache_bf16_ties_up",
        KERNELS + "rope.py",
        _one("bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits + 0x8000"),
        ROPE_TESTS,
        "the bf16 K/V cache write rounds ties away from zero instead of to even",
    ),
    Mutation(
        "rope_cache_at_position",
        KERNELS + "rope.py",
        (
            (
                "tl.store(kc_ptr + slot * stride_kc + hk * D + d, ky, mask=mask)",
                "tl.store(kc_ptr + pos * stride_kc + hk * D + d, ky, mask=mask)",
            ),
            (
                "tl.store(vc_ptr + slot * stride_vc + hk * DV + dv, v, mask=v_mask)",
                "tl.store(vc_ptr + pos * stride_vc + hk * DV + dv, v, mask=v_mask)",
            ),
        ),
        ROPE_TESTS,
        "the K/V cache write goes to the token's position instead of its slot in the pool",
    ),
    Mutation(
        "cache_f16_truncates",
        KERNELS + "rope.py",
        _one(
            "        return x.to(dtype)",
            '        return x.to(dtype, fp_downcast_rounding="rtz")',
        ),
        ROPE_TESTS,
        "the f16 K/V cache write rounds toward zero",
    ),
    Mutation(
        "swiglu_exp_sign",
        KERNELS + "activation.py",
        _one("return g / (1.0 + tl.exp(-g)) * u", "return g / (1.0 + tl.exp(g)) * u"),
        ACTIVATION_TESTS,
        "silu(g) computed as g * sigmoid(-g)",
    ),
    Mutation(
        "attention_no_rescale",
        KERNELS + "attention.py",
        _one("acc = acc * alpha[:, None]", "acc = acc"),
        ATTENTION_TESTS,
        "the online softmax forgets to rescale the accumulator when the max grows",
    ),
    Mutation(
        "attention_merge_weights",
        KERNELS + "attention.py",
        _one("alpha = tl.exp2(m_i - m_new)", "alpha = tl.exp2(m_new - m_i)"),
        ATTENTION_TESTS,
        "the online softmax rescales by the inverse factor",
    ),
    Mutation(
        "attention_block_table_ignored",
        KERNELS + "attention.py",
        _one(
            "rows = block * KV_BLOCK + (s0 % KV_BLOCK) + offs  # [BLOCK_S] pool rows (int64)",
            "rows = (s0 + offs).to(tl.int64)  # [BLOCK_S] pool rows (int64)",
        ),
        ATTENTION_TESTS,
        "paged decode attention reads position j at pool row j (the block table is not used)",
    ),
    Mutation(
        "attention_single_buffered",
        "kiln/kernels/attention.py",
        _one(
            "num_stages=_triton_stages(cfg.num_stages),",
            "num_stages=cfg.num_stages,",
        ),
        ("tests/kernels/test_attention.py::test_attention_kernels_compile_for_sm90",),
        "the block-table load takes a pipeline stage from K/V: one K/V step in flight, not two",
    ),
    Mutation(
        "attention_first_row_length",
        KERNELS + "attention.py",
        _one(
            "length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), NB * KV_BLOCK)",
            "length = tl.minimum(tl.load(len_ptr).to(tl.int32), NB * KV_BLOCK)",
        ),
        ATTENTION_TESTS,
        "every row of a batch attends over the first row's length",
    ),
    Mutation(
        "attention_combine_first_row",
        KERNELS + "attention.py",
        _one("row = b * P  # this row's first slice", "row = 0  # this row's first slice"),
        ATTENTION_TESTS,
        "the combine of every row merges the first row's partial results",
    ),
    Mutation(
        "flash_causal_off_by_one",
        KERNELS + "flash_attention.py",
        _one(
            "last = tl.minimum(pos, hi - 1)  # [BLOCK_R] the last key each row sees",
            "last = tl.minimum(pos + 1, hi - 1)  # [BLOCK_R] the last key each row sees",
        ),
        FLASH_TESTS,
        "prompt attention: each query also sees the key after its own (the causal limit + 1)",
    ),
    Mutation(
        "flash_unmasked_past_diagonal",
        KERNELS + "flash_attention.py",
        _one(
            "lo = tl.minimum(first, kv_len) // BLOCK_N * BLOCK_N",
            "lo = (tl.minimum(first, kv_len) + BLOCK_N - 1) // BLOCK_N * BLOCK_N",
        ),
        FLASH_TESTS,
        "prompt attention: the unmasked key steps run into the diagonal block (rounded up)",
    ),
    Mutation(
        "flash_tile_sequence",
        KERNELS + "flash_attention.py",
        _one(
            "b = tl.sum((through <= t).to(tl.int32), axis=0)",
            "b = tl.sum((through < t).to(tl.int32), axis=0)",
        ),
        FLASH_TESTS,
        "prompt attention: a sequence's last tile is taken as the next sequence's",
    ),
    Mutation(
        "flash_gqa_heads",
        KERNELS + "flash_attention.py",
        _one("head = kvh * GROUP + r % GROUP", "head = kvh + r % GROUP * (H // GROUP)"),
        FLASH_TESTS,
        "prompt attention: query heads grouped by stride Hkv instead of consecutively",
    ),
    Mutation(
        "q8_q4k_min_sign",
        KERNELS + "matvec_q8.py",
        _one(
            "acc -= (dmin * mn)[None] * (dx * sq.to(tl.float32))",
            "acc += (dmin * mn)[None] * (dx * sq.to(tl.float32))",
        ),
        Q8_TESTS,
        "int8 mat-vec, Q4_K: the low sub-block's minimum added instead of subtracted",
    ),
    Mutation(
        "q8_q6k_offset",
        KERNELS + "matvec_q8.py",
        _one("_dp4a(c0[None], a, -32 * sq, DP4A)", "_dp4a(c0[None], a, -31 * sq, DP4A)"),
        Q8_TESTS,
        "int8 mat-vec, Q6_K: quants centred on 31 instead of 32",
    ),
    Mutation(
        "mmq_offset_dropped",
        KERNELS + "matmul_q8.py",
        _one(
            "acc += s * (dot.to(tl.float32) * xd) + o * xs",
            "acc += s * (dot.to(tl.float32) * xd)",
        ),
        MMQ_TESTS,
        "int8 tensor-core GEMM: the groups' offsets (Q4_1's m, Q4_K's minimums) dropped",
    ),
    Mutation(
        "mmq_q6k_halves",
        KERNELS + "matmul_q8.py",
        _one(
            "lo = tl.dot(q, tl.where(i < 16, xq, zero)",
            "lo = tl.dot(q, tl.where(i < 15, xq, zero)",
        ),
        MMQ_TESTS,
        "int8 tensor-core GEMM, Q6_K: value 15 of each group left out of the first half's dot",
    ),
    Mutation(
        "mmq_split_start",
        KERNELS + "matmul_q8.py",
        _one("g0 = pid_k * SPLIT_GROUPS + step * GROUPS", "g0 = pid_k * SPLIT_GROUPS + step"),
        MMQ_TESTS,
        "int8 tensor-core GEMM: the K step advances by one group instead of GROUPS",
    ),
    Mutation(
        "mmq_last_split_mask",
        KERNELS + "matmul_q8.py",
        _one("live = tl.where(g < groups, 1.0, 0.0)", "live = tl.where(g < groups + 1, 1.0, 0.0)"),
        MMQ_TESTS,
        "int8 tensor-core GEMM: a step past K counts group 0 once more",
    ),
    Mutation(
        "q8_q5_fifth_bit",
        KERNELS + "matvec_q8.py",
        _one(
            "(((bits & 15) * 0x00204081) & 0x01010101) << 4",
            "(((bits & 15) * 0x00204080) & 0x01010101) << 4",
        ),
        Q8_TESTS,
        "int8 mat-vec, Q5_0/Q5_1: the fifth bit of each lane's first value dropped",
    ),
    Mutation(
        "q8_rounding",
        KERNELS + "quantize.py",
        _one("q = t + (2.0 * (r - t.to(tl.float32))).to(tl.int32)", "q = t"),
        Q8_TESTS,
        "q8_1 quantize truncates instead of rounding half away from zero",
    ),
    Mutation(
        "norm_quant_scale_block",
        KERNELS + "quantize.py",
        _one(
            "tl.store(ds_ptr + 2 * blk, d, mask=ok)", "tl.store(ds_ptr + 2 * blk, 2 * d, mask=ok)"
        ),
        Q8_TESTS,
        "q8_1 quantize stores twice the block scale",
    ),
    Mutation(
        "matvec_lanes_affine_min",
        KERNELS + "matvec.py",
        _one("acc += d * p + m * sx", "acc += d * p - m * sx"),
        MATVEC_TESTS,
        "Q4_1/Q5_1 mat-vec (M = 1 lanes kernel) subtracts the block minimum",
    ),
    Mutation(
        "matvec_rows_read_row0",
        KERNELS + "matvec.py",
        _one(
            "xv = tl.load(x_ptr + m4 * stride_xm + k[None], mask=k_ok[None] & (m4 < M), other=0.0)",
            "xv = tl.load(x_ptr + k[None], mask=k_ok[None] & (m4 < M), other=0.0)",
        ),
        MATVEC_TESTS,
        "the M > 1 mat-vec multiplies every row's weights by x row 0",
    ),
    Mutation(
        "matvec_q4_0_offset",
        KERNELS + "dequant.py",
        _one("w = d * (q.to(tl.float32) - 8.0)", "w = d * (q.to(tl.float32) - 7.0)"),
        MATVEC_TESTS,
        "Q4_0 dequantized with the wrong zero point (the byte kernel and the embedding)",
    ),
    Mutation(
        "moe_slot_x",
        KERNELS + "matvec.py",
        _one(
            "x_ptr + x_row * stride_xs, out_ptr + slot * stride_os",
            "x_ptr, out_ptr + slot * stride_os",
        ),
        MOE_TESTS,
        "every expert slot reads x row 0 (the MoE down projection's per-slot inputs)",
    ),
    Mutation(
        "moe_token_x_row",
        KERNELS + "matvec.py",
        _one(
            "x_row = slot // SLOTS_PER_X",
            "x_row = slot % (tl.num_programs(1) // SLOTS_PER_X)",
        ),
        MOE_TESTS,
        "a batch's slots read the token rows in [k, T] order (slot s reads row s % T, not s // k)",
    ),
    Mutation(
        "moe_expert_id",
        KERNELS + "matvec.py",
        _one(
            "expert = tl.load(ids_ptr + slot).to(tl.int64)",
            "expert = slot.to(tl.int64)",
        ),
        MOE_TESTS,
        "slot s runs expert s instead of the expert chosen for it",
    ),
    Mutation(
        "router_unnormalized",
        KERNELS + "router.py",
        _one("p = ex / tl.sum(ex, axis=0)", "p = ex"),
        ROUTER_TESTS,
        "route_topk returns exp(logit - max), not probabilities",
    ),
    Mutation(
        "router_combine_unweighted",
        KERNELS + "router.py",
        _one("acc += ws * d", "acc += d"),
        ROUTER_TESTS,
        "the MoE combine sums the experts' outputs without their weights",
    ),
    Mutation(
        "router_combine_token_rows",
        KERNELS + "router.py",
        _one("down_ptr += t * K * stride_d", "down_ptr += t * stride_d"),
        ROUTER_TESTS,
        "the MoE combine of token t sums rows t .. t + k - 1 instead of its own k slot rows",
    ),
    Mutation(
        "embedding_kquant_layout",
        KERNELS + "embedding.py",
        _one(
            "tl.store(dst + b * 256 + s * 32 + j, w, mask=b < nb)",
            "tl.store(dst + b * 256 + j * 8 + s, w, mask=b < nb)",
        ),
        EMBEDDING_TESTS,
        "K-quant embedding rows stored with sub-block and value swapped",
    ),
    Mutation(
        "embedding_row",
        KERNELS + "embedding.py",
        _one("row = tl.load(ids_ptr + t).to(tl.int64)", "row = t.to(tl.int64)"),
        EMBEDDING_TESTS,
        "token t gets embedding row t instead of row ids[t]",
    ),
    Mutation(
        "matmul_weight_k_offset",
        KERNELS + "matmul.py",
        _one(
            "g = k0 // 32 + tl.arange(0, G)[None, :, None, None]",
            "g = k0 // 64 + tl.arange(0, G)[None, :, None, None]",
        ),
        MATMUL_TESTS,
        "GEMM: a K step's first weight block counted in 64 values instead of 32 (wrong K offset)",
    ),
    Mutation(
        "matmul_x_k_offset",
        KERNELS + "matmul.py",
        _one(
            "kx = k0 + tl.arange(0, BLOCK_K)[None, :]",
            "kx = tl.arange(0, BLOCK_K)[None, :]",
        ),
        MATMUL_TESTS,
        "GEMM: every K step multiplies by the first BLOCK_K values of x",
    ),
    Mutation(
        "matmul_kquant_scale",
        KERNELS + "dequant.py",
        _one(
            "sc = tl.where(s < 4, a & 63, (b & 15) | ((c >> 6) << 4))",
            "sc = tl.where(s < 4, a & 31, (b & 15) | ((c >> 6) << 4))",
        ),
        MATMUL_TESTS,
        "Q4_K/Q5_K sub-blocks 0..3 lose the top bit of their 6-bit scale (the GEMM's tiles)",
    ),
    Mutation(
        "matmul_bf16_truncates",
        KERNELS + "matmul.py",
        _one("bits = bits + 0x7FFF + ((bits >> 16) & 1)", "bits = bits"),
        MATMUL_TESTS,
        "GEMM and dequant_matmul: weights rounded to bf16 toward zero, not to nearest even",
    ),
    Mutation(
        "matmul_group_order",
        KERNELS + "matmul.py",
        _one("pid_n = (pid % per_group) // group_m", "pid_n = (pid % per_group) % group_m"),
        MATMUL_TESTS,
        "GEMM: the grouped launch order maps programs onto the wrong column tiles",
    ),
    Mutation(
        "matmul_ragged_group",
        KERNELS + "matmul.py",
        _one(
            "group_m = tl.minimum(tiles_m - first_m, GROUP_M)",
            "group_m = GROUP_M + 0 * tiles_m",
        ),
        MATMUL_TESTS,
        "GEMM: the last launch group taken as GROUP_M row tiles even where fewer are left",
    ),
    # -- the reference ops (kiln/ops/reference.py): the spec and the CPU oracle -----------------
    Mutation(
        "ref_embedding",
        REFERENCE,
        _one("return weight.rows(ids)", "return weight.rows(ids.flip(0))"),
        (*EMBEDDING_TESTS, *HF_LLAMA),
        "embedding rows in the reverse token order",
    ),
    Mutation(
        "ref_linear_bias",
        REFERENCE,
        _one(
            "return F.linear(x, weight.dense(), bias.dense() if bias is not None else None)",
            "return F.linear(x, weight.dense())",
        ),
        HF_QWEN2,
        "linear ignores the bias (qwen2's Q/K/V biases)",
    ),
    Mutation(
        "ref_rms_norm_eps",
        REFERENCE,
        _one(
            "scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)",
            "scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True))",
        ),
        ("tests/kernels/test_norm.py", *NOT_SM90),
        "the reference RMSNorm without eps",
    ),
    Mutation(
        "ref_add_rms_norm",
        REFERENCE,
        _one("h = residual + x", "h = x"),
        ("tests/kernels/test_norm.py", *NOT_SM90),
        "add_rms_norm drops the residual stream",
    ),
    Mutation(
        "rope_freq_factors_multiplied",
        REFERENCE,
        _one(
            "freqs = freqs / freq_factors.to(device=device, dtype=torch.float32)",
            "freqs = freqs * freq_factors.to(device=device, dtype=torch.float32)",
        ),
        HF_LLAMA3,
        "llama 3's rope_freqs factors multiply the frequencies instead of dividing them",
    ),
    Mutation(
        "ref_rope_neox_sign",
        REFERENCE,
        _one(
            "out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)",
            "out = torch.cat((a * cos + b * sin, a * sin - b * cos), dim=-1)",
        ),
        (*ROPE_TESTS, *HF_QWEN3),
        "NEOX RoPE (qwen) rotates the wrong way",
    ),
    Mutation(
        "ref_attention_mask",
        REFERENCE,
        _one(
            "mask = key_pos[None, :] <= q_positions[:, None]  # [T, S]",
            "mask = key_pos[None, :] < q_positions[:, None]  # [T, S]",
        ),
        HF_LLAMA,
        "causal mask hides each token from itself",
    ),
    Mutation(
        "ref_attention_decode_length",
        REFERENCE,
        _one(
            "visible = positions[None, :] < seq_lens[:, None]  # [B, C]",
            "visible = positions[None, :] < seq_lens[:, None] - 1  # [B, C]",
        ),
        ATTENTION_TESTS,
        "decode attention leaves out the newest key",
    ),
    Mutation(
        "ref_attention_decode_table",
        REFERENCE,
        _one(
            "rows = (block_tables.long()[:, :, None] * block_size + offs).reshape(n_rows, -1)",
            "rows = (block_tables.long()[:1, :, None] * block_size + offs).expand(n_rows, -1, -1)"
            ".reshape(n_rows, -1)",
        ),
        ATTENTION_TESTS,
        "the reference's decode attention reads every row through the first row's block table",
    ),
    Mutation(
        "ref_qk_norm_weight",
        REFERENCE,
        _one(
            "return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)",
            "return rms_norm(q, q_weight, eps), rms_norm(k, q_weight, eps)",
        ),
        ("tests/kernels/test_norm.py", *NOT_SM90),
        "qk_norm normalizes K with Q's weight",
    ),
    Mutation(
        "ref_qkv_norm_rope_k",
        REFERENCE,
        _one(
            "    k = rope(k, positions, freqs, neox)\n    k_cache.index_copy_(0, slots,",
            "    k_cache.index_copy_(0, slots,",
        ),
        ROPE_TESTS,
        "qkv_norm_rope writes K into the cache without RoPE",
    ),
    Mutation(
        "ref_qkv_norm_rope_slot",
        REFERENCE,
        _one(
            "k_cache.index_copy_(0, slots, k.to(k_cache.dtype))",
            "k_cache.index_copy_(0, positions, k.to(k_cache.dtype))",
        ),
        ROPE_TESTS,
        "the reference's qkv_norm_rope writes K at the position instead of the slot",
    ),
    Mutation(
        "ref_swiglu_swapped",
        REFERENCE,
        _one(
            "return F.silu(gate.float()) * up.float()",
            "return F.silu(up.float()) * gate.float()",
        ),
        ACTIVATION_TESTS,
        "silu applied to up instead of gate",
    ),
    Mutation(
        "ref_moe_route_unnormalized",
        REFERENCE,
        _one(
            "return moe_select(linear(x, router), n_used, normalize)",
            "return moe_select(linear(x, router), n_used, False)",
        ),
        HF_QWEN3MOE,
        "moe_route ignores norm_topk_prob (qwen3moe renormalizes the top-k weights)",
    ),
    Mutation(
        "ref_moe_select_logits",
        REFERENCE,
        _one(
            "weights, ids = torch.topk(probs, n_used, dim=-1)",
            "weights, ids = torch.topk(router_logits, n_used, dim=-1)",
        ),
        (*ROUTER_TESTS, *HF_QWEN3MOE),
        "the router's weights are logits, not probabilities",
    ),
    Mutation(
        "ref_expert_linear_order",
        REFERENCE,
        _one(
            "w = _gather_experts(weight, ids.reshape(-1).long())  # [T*k, N, K]",
            "w = _gather_experts(weight, ids.reshape(-1).sort().values.long())  # [T*k, N, K]",
        ),
        MOE_TESTS,
        "expert_linear pairs slots with the experts in sorted order",
    ),
    Mutation(
        "ref_expert_linear_token_rows",
        REFERENCE,
        _one(
            "rows = x.float()[:, None, :].expand(t, k, x.shape[1]).reshape(t * k, x.shape[1])",
            "rows = x.float()[None, :, :].expand(k, t, x.shape[1]).reshape(t * k, x.shape[1])",
        ),
        MOE_TESTS,
        "expert_linear gives slot t*k + j the x row (t*k + j) % T instead of token t's",
    ),
    Mutation(
        "ref_moe_combine_unweighted",
        REFERENCE,
        _one(
            "return (down.reshape(t, k, -1) * weights[:, :, None]).sum(1)",
            "return down.reshape(t, k, -1).sum(1)",
        ),
        ROUTER_TESTS,
        "moe_combine sums the experts' outputs without their weights",
    ),
    Mutation(
        "ref_moe_ffn_slot_weight",
        REFERENCE,
        _one(
            "out.index_add_(0, token, (h @ down.expert(e).T) * weights[token, slot, None])",
            "out.index_add_(0, token, (h @ down.expert(e).T) * weights[token, 0, None])",
        ),
        HF_QWEN3MOE,
        "moe_ffn weights every expert by the first slot's weight",
    ),
    # -- the sampler (kiln/runtime/sampler.py) ---------------------------------------------------
    Mutation(
        "sampler_temperature_first",
        SAMPLER,
        (
            (
                '    inf = float("-inf")\n    if step.top_p:\n',
                '    inf = float("-inf")\n    logits = logits / step.column(_TEMPERATURE).float()\n'
                "    if step.top_p:\n",
            ),
            (
                "torch.where(diff < 0, diff / step.column(_TEMPERATURE), 0.0)",
                "torch.where(diff < 0, diff, 0.0)",
            ),
        ),
        SAMPLER_TESTS,
        "temperature applied before top-k/top-p/min-p instead of after (llama.cpp's order)",
    ),
    Mutation(
        "sampler_top_p_not_scattered",
        SAMPLER,
        _one("drop = torch.empty_like(drop).scatter_(1, order, drop)", "pass"),
        SAMPLER_TESTS,
        "top-p's mask stays in sorted order instead of going back to vocabulary order",
    ),
    Mutation(
        "sampler_top_p_in_float64",
        SAMPLER,
        _one("top_p = _float32(p.top_p) if", "top_p = p.top_p if"),
        SAMPLER_TESTS,
        "top-p compares the float32 sums with top_p in float64, not rounded to float32 as before",
    ),
    Mutation(
        "sampler_top_p_off_is_one",
        SAMPLER,
        _one("if p.top_p < 1.0 and not p.greedy else inf", "if not p.greedy else inf"),
        SAMPLER_TESTS,
        "a row with top_p = 1 (off) still runs top-p with threshold 1.0 beside a row with it on",
    ),
    Mutation(
        "sampler_rows_share_a_seed",
        SAMPLER,
        _one(
            "uniforms = [uniform(s.seed, s.steps) for s in samplers]",
            "uniforms = [uniform(samplers[0].seed, s.steps) for s in samplers]",
        ),
        SAMPLER_TESTS,
        "every row of a batch draws with the first row's seed",
    ),
    Mutation(
        "sampler_draw_cdf_ge",
        SAMPLER,
        _one("torch.searchsorted(cdf, target, right=True)", "torch.searchsorted(cdf, target)"),
        SAMPLER_TESTS,
        "the draw takes the first index whose sum reaches u * total (a zero-probability token "
        "can win at u = 0) instead of the first that exceeds it",
    ),
    Mutation(
        "sampler_penalty_pad_token_0",
        SAMPLER,
        _one(
            "row += ids + ids[:1] * pad + n + n[:1] * pad",
            "row += ids + [0] * pad + n + [0] * pad",
        ),
        SAMPLER_TESTS,
        "a row's padded penalty entries point at token 0 under the row's penalties",
    ),
    Mutation(
        "grouped_x_row_per_slot",
        KERNELS + "moe.py",
        _one(
            "x_row = tl.where(slot_ok, slots // SLOTS_PER_X, 0)",
            "x_row = tl.where(slot_ok, slots, 0)",
        ),
        GROUPED_TESTS,
        "the grouped GEMM reads x row s for slot s also where a token's k slots share its row",
    ),
    Mutation(
        "grouped_plan_unpadded",
        "kiln/kernels/moe.py",
        _one("padded = (counts + bm - 1) // bm * bm", "padded = counts"),
        GROUPED_TESTS,
        "the plan does not pad each expert's run to whole blocks: a block mixes two experts",
    ),
]


@dataclass
class Outcome:
    name: str
    status: str  # "caught", "SURVIVED", "ERROR"
    seconds: float
    detail: str


def make_copy(root: Path) -> Path:
    """kiln/, tests/ and pyproject.toml under root/repo (no caches), ../shared linked beside."""
    repo = root / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=ignore)
        else:
            shutil.copy2(src, repo / name)
    shared = REPO.parent / "shared"
    if shared.exists():
        (root / "shared").symlink_to(shared)
    return repo


def environment(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # every run compiles what it imports: no stale .pyc
    return env


def run_tests(repo: Path, args: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """(pytest's exit status, or None on a timeout; its output)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        r = subprocess.run(
            cmd, cwd=repo, env=environment(repo), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out
    return r.returncode, r.stdout + r.stderr


def first_failure(output: str) -> str:
    m = re.search(r"^(FAILED|ERROR) (\S+)", output, re.M)
    return m.group(2) if m else output.strip().splitlines()[-1] if output.strip() else ""


def apply(repo: Path, m: Mutation) -> str:
    """Apply m to the copy; returns the file's original text (to put back)."""
    path = repo / m.file
    text = path.read_text()
    mutated = text
    for original, replacement in m.edits:
        count = mutated.count(original)
        if count != 1:
            raise ValueError(f"{m.file}: the snippet {original!r} occurs {count} times, not once")
        mutated = mutated.replace(original, replacement)
    path.write_text(mutated)
    return text


def split_selection(tests: tuple[str, ...]) -> tuple[list[str], str | None]:
    """(files and node ids, the -k expression or None)."""
    paths, keyword, rest = [], None, list(tests)
    while rest:
        arg = rest.pop(0)
        if arg == "-k":
            assert keyword is None and rest, f"one -k EXPR at most: {tests}"
            keyword = rest.pop(0)
        else:
            assert not arg.startswith("-"), f"only files, node ids and -k EXPR: {tests}"
            paths.append(arg)
    return paths, keyword


def baseline_runs(mutations: list[Mutation]) -> list[tuple[str, ...]]:
    """The covering tests of all the mutations, each once: one pytest run per -k expression."""
    groups: dict[str | None, list[str]] = {}
    for m in mutations:
        paths, keyword = split_selection(m.tests)
        groups.setdefault(keyword, [])
        groups[keyword] += [p for p in paths if p not in groups[keyword]]
    runs = []
    for keyword, paths in groups.items():
        files = {p for p in paths if "::" not in p}
        paths = [p for p in paths if p.split("::")[0] not in files or "::" not in p]
        runs.append((*paths, *(("-k", keyword) if keyword is not None else ())))
    return runs


def check_imports_copy(repo: Path) -> None:
    code = "import kiln; print(kiln.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env=environment(repo),
        capture_output=True,
        text=True,
    )
    where = Path(r.stdout.strip()).resolve() if r.returncode == 0 else None
    if where is None or repo.resolve() not in where.parents:
        sys.exit(f"mutate.py: the tests would import kiln from {where}, not from the copy {repo}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", action="append", metavar="NAME", help="run these (repeatable)")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests without mutations"
    )
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per test run")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:<30} {m.file:<32} {m.bug}")
            print(f"{'':<30} tests: {shlex.join(m.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="kiln-mutate-") as tmp:
        repo = make_copy(Path(tmp))
        check_imports_copy(repo)
        for m in chosen:  # every snippet must still be in the code before anything runs
            (repo / m.file).write_text(apply(repo, m))  # put back at once
        if not args.no_baseline:
            for tests in baseline_runs(chosen):
                t0 = time.perf_counter()
                code, out = run_tests(repo, tests, args.timeout)
                seconds = time.perf_counter() - t0
                print(f"baseline {seconds:6.1f} s  {shlex.join(tests)}", flush=True)
                if code != 0:
                    print(out[-3000:])
                    print(f"mutate.py: the covering tests fail without any mutation: {tests}")
                    return 2
        outcomes = []
        for m in chosen:
            original = apply(repo, m)
            t0 = time.perf_counter()
            try:
                code, out = run_tests(repo, m.tests, args.timeout)
            finally:
                (repo / m.file).write_text(original)
            seconds = time.perf_counter() - t0
            if code is None:
                outcome = Outcome(m.name, "caught", seconds, f"timeout after {args.timeout:.0f} s")
            elif code == 1:
                outcome = Outcome(m.name, "caught", seconds, first_failure(out))
            elif code == 0:
                outcome = Outcome(m.name, "SURVIVED", seconds, m.bug)
            else:
                outcome = Outcome(m.name, "ERROR", seconds, f"pytest exit {code}: {out[-500:]}")
            outcomes.append(outcome)
            print(
                f"{outcome.status:<8} {seconds:6.1f} s  {m.name:<30} {outcome.detail}", flush=True
            )

    survivors = [o for o in outcomes if o.status != "caught"]
    print(
        f"\n{len(outcomes) - len(survivors)} of {len(outcomes)} mutations caught"
        + (f"; not caught: {', '.join(o.name for o in survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

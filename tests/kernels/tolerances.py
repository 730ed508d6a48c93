"""The one tolerance table of the kernel tests: (format, activation dtype) -> (rtol, atol, reason).

A kernel output y passes against the reference r when, elementwise,
    |y - r| <= atol + rtol * (|x| @ |W|.T)
i.e. the error is measured against the sum of magnitudes of the terms, not against r, which can
cancel to ~0. With fp32 accumulation the error of a K-term sum in another order is about
sqrt(K) * 2**-24 of that sum (K = 4096: 4e-6), so rtol = 2e-5 leaves a 5x margin.
"""

from __future__ import annotations

import torch

_ACT = (torch.float32, torch.float16, torch.bfloat16)

# Why each format needs what it needs. The activation dtype never widens the bound: the kernel
# and the reference both convert x to float32 exactly before multiplying.
_REASONS = {
    "F32": "weights exact; only the fp32 summation order differs",
    "F16": "f16 -> f32 is exact; only the fp32 summation order differs",
    "BF16": "bf16 -> f32 is exact; only the fp32 summation order differs",
    "Q8_0": "d * q is one rounding as in the reference; summation order differs",
    "Q4_0": "the M = 1 kernel sums a lane's (q - 8) * x exactly, then multiplies by d once; "
    "summation order differs",
    "Q4_1": "d * q + m may be fused to one FMA (the reference rounds twice): 1 ulp per weight",
    "Q5_0": "the M = 1 kernel sums a lane's (q - 16) * x exactly, then multiplies by d once; "
    "summation order differs",
    "Q5_1": "d * q + m may be fused to one FMA (the reference rounds twice): 1 ulp per weight",
    "Q4_K": "(d*sc)*q - dmin*m may be fused to one FMA: 1 ulp per weight; summation order",
    "Q5_K": "(d*sc)*q - dmin*m may be fused to one FMA: 1 ulp per weight; summation order",
    "Q6_K": "(d*sc)*(q-32) is rounded as in the reference; summation order differs",
}

MATVEC: dict[tuple[str, torch.dtype], tuple[float, float, str]] = {
    (fmt, act): (2e-5, 1e-6, reason) for fmt, reason in _REASONS.items() for act in _ACT
}

# The int8-activation mat-vec (kiln/kernels/matvec_q8.py) against reference.linear of the
# dequantized q8_1 x, by weight format: (rtol, atol, reason). Its products are exact integer dot
# products of 4 or 8 values; the rest is fp32 roundings of the scale products per lane.
MATVEC_Q8: dict[str, tuple[float, float, str]] = {
    "Q8_0": (2e-5, 1e-6, "(d_w * (d_x * dot)): two roundings a lane of 8; summation order"),
    "Q4_0": (2e-5, 1e-6, "as Q8_0; q - 8 folded into the exact integer dot product"),
    "Q4_1": (2e-5, 1e-6, "d * (d_x * dot) + m * (d_x * sum q_x): 4 roundings a lane of 8"),
    "Q5_0": (2e-5, 1e-6, "as Q4_0; q - 16 folded into the exact integer dot product"),
    "Q5_1": (2e-5, 1e-6, "as Q4_1"),
    "Q4_K": (
        2e-5,
        1e-6,
        "(d * sc) * (d_x * dot) - (dmin * m) * (d_x * sum q_x): two products a lane of 8 that may "
        "cancel; 1 ulp each of the terms' magnitudes; summation order",
    ),
    "Q5_K": (2e-5, 1e-6, "as Q4_K"),
    "Q6_K": (2e-5, 1e-6, "(d * sc) * (d_x * dot), q - 32 folded into the integer dot product"),
}

# The decode fusions (kiln/kernels/norm.py, rope.py, activation.py): op -> (rtol, atol, reason).
# rtol is relative to the magnitude of the terms (|reference| where nothing cancels; |a| + |b| for
# a rotated pair, whose a cos - b sin may cancel to ~0).
DECODE_FUSIONS: dict[str, tuple[float, float, str]] = {
    "rms_norm": (
        2e-5,
        1e-6,
        "sum of squares in a tree order (torch: its own), rsqrt.approx and div.full on the GPU "
        "(a few ulp): ~1e-6 relative measured; nothing cancels",
    ),
    "add_rms_norm.h": (0.0, 0.0, "residual + x is one fp32 add of the same two values: exact"),
    "add_rms_norm": (2e-5, 1e-6, "as rms_norm, on the same h"),
    "qk_norm": (2e-5, 1e-6, "as rms_norm, over D"),
    "qkv_norm_rope": (
        2e-5,
        1e-6,
        "norm as rms_norm; cos/sin within ~2 ulp of torch's (libdevice on the GPU, numpy under "
        "the interpreter) at the same fp32 angle; a cos - b sin may be fused to an FMA",
    ),
    "qkv_norm_rope.cache.float32": (2e-5, 1e-6, "the rotated K as qkv_norm_rope, stored as is"),
    "qkv_norm_rope.cache.float16": (
        2e-5 + 2**-10,
        1e-6,
        "values a few fp32 ulp apart may round to neighbouring f16 values: 1 f16 ulp (2^-10 rel.)",
    ),
    "qkv_norm_rope.cache.bfloat16": (
        2e-5 + 2**-7,
        1e-6,
        "values a few fp32 ulp apart may round to neighbouring bf16 values: 1 bf16 ulp (2^-7 rel.)",
    ),
    "swiglu": (
        1e-5,
        1e-6,
        "gate / (1 + exp(-gate)) * up as torch's silu; exp is ex2.approx and / is div.full on the "
        "GPU (a few ulp); nothing cancels",
    ),
}

# Decode attention (kiln/kernels/attention.py), by cache dtype: (rtol, atol, reason). An output of
# head h passes when |y - r| <= atol + rtol * (1 + S_h) * sum_i w_i |v_i| (tests/kernels/
# test_attention.py): a relative error e in the terms of the scores (S_h: the largest sum of
# their magnitudes) moves the softmax weights by up to 2 e S_h, and sum_i w_i |v_i| is the
# magnitude of the weighted sum. Measured on random inputs under the interpreter (normalized
# error): f32 1.5e-7, f16 1.4e-7, bf16 3.2e-6.
ATTENTION_DECODE: dict[torch.dtype | str, tuple[float, float, str]] = {
    torch.float32: (
        5e-6,
        1e-6,
        "fp32 scores and sums in another order (blocks of keys, slices, the combine over up to "
        "P slices) and exp2 of log2(e)-prescaled scores (ex2.approx: 2 ulp) against torch's exp",
    ),
    torch.float16: (
        5e-6,
        1e-6,
        "as float32: q and the softmax weights enter the f16 MMAs as hi + lo f16 pairs (22 "
        "significant bits, 2^-23 relative), below the fp32 summation error",
    ),
    torch.bfloat16: (
        2e-5,
        1e-6,
        "q and the softmax weights enter the bf16 MMAs as hi + lo bf16 pairs: 16 significant "
        "bits, 2^-18 relative each; 2 * 2^-18 * S_h + 2^-18 < 8e-6 * (1 + S_h), and a margin",
    ),
    "blocks as f16": (
        2.5 * 2**-11 + 5e-6,
        1e-6,
        "q8_0 / q4_0 values rounded to f16 for the MMAs (u = 2^-11 of each; the reference "
        "multiplies the exact dequantized values): u S_h in a score moves the weights by up to "
        "2 u S_h, u more in V; q and p as hi + lo pairs as for f16; + float32's",
    ),
}

# MoE decode routing and combine (kiln/kernels/router.py), by output: (rtol, atol, reason). The
# route_topk ids are compared exactly (the tests keep the probabilities apart: no near-ties).
# Weights pass when |w - r| <= atol + rtol * |r|; combine when |y - r| <= atol + rtol *
# sum_s |weights[0, s] * down[s]|.
ROUTER: dict[str, tuple[float, float, str]] = {
    "route_topk.weights": (
        1e-5,
        1e-7,
        "exp is ex2.approx of a log2(e)-prescaled argument on the GPU: ~|x - max| * 2^-24 "
        "relative (< 2e-6 at a logit spread of 30) + 2 ulp; the sum over E in a tree order, "
        "div.full (2 ulp), and the renormalizing sum of k in another order",
    ),
    "combine": (
        1e-6,
        0.0,
        "the same k products summed in the same slot order; the GPU may fuse a product and its "
        "add into one FMA and torch's CUDA sum may pair the terms otherwise: at most k - 1 "
        "roundings of 2^-24 of the sum of magnitudes (k = 8: 4.2e-7)",
    ),
}

# The GEMM (kiln/kernels/matmul.py: the Triton kernel and dequant_matmul) against the float32
# reference, by weight format: (l2, l1, atol, reason). With t_k = x_k * W[n, k], output n passes
# when (tests/kernels/test_matmul.py)
#     |y - r| <= atol + l1 * sum_k |t_k| + l2 * sqrt(sum_k t_k^2)
# x and every weight value are rounded to bf16 for the tensor cores (8 significant bits, to
# nearest even: relative errors a_k, b_k with |a_k|, |b_k| <= u = 2^-8), multiplied exactly and
# summed in fp32, so y - r = sum_k t_k (a_k + b_k + a_k b_k) + the fp32 summation error. On the
# tests' random inputs the a_k, b_k are independent with mean 0: the sum is a random walk whose
# standard deviation is at most sqrt(2/3) u ||t||_2 (a uniform relative error has variance
# u^2 / 3), i.e. it grows as sqrt(K) |x| |w| 2^-8, not as K. Measured under the interpreter
# (M = 128, N = 64, K = 768..1024, every family): standard deviation 0.60 u ||t||_2, the largest
# of 8192 outputs 2.7 u ||t||_2 (bf16 weights, b_k = 0: 0.42 and 1.6). l2 = 8 u is 13 of those
# deviations: never reached by chance, while a wrong scale or a value read from the wrong place
# moves an output by about ||t||_2. (The bound that holds for any input, 2^-7 sum_k |t_k|, is
# ~K / 10 times larger on random data and would hide such bugs for K in the thousands.) l1 is the
# fp32 summation's allowance of MATVEC (the tensor cores' accumulation order included). A bf16
# output adds its own rounding, u * |y| (the test adds it).
_BF16_U = 2.0**-8
_MATMUL_REASONS = {
    "F32": "x and the f32 weight rounded to bf16 (see above)",
    "F16": "x and the f16 weight rounded to bf16 (see above)",
    "BF16": "only x is rounded (the weight is bf16 already): the bound has a 2x margin more",
    "Q8_0": "the dequantized d * q (fp32, as the reference) rounded to bf16, and x",
    "Q4_0": "the dequantized d * (q - 8) rounded to bf16, and x",
    "Q4_1": "d * q + m rounded to bf16; the GPU may fuse it into one FMA (a 1-ulp fp32 change "
    "that moves the bf16 rounding of about one weight in 2^16: inside the random walk), and x",
    "Q5_0": "the dequantized d * (q - 16) rounded to bf16, and x",
    "Q5_1": "d * q + m rounded to bf16 (FMA as Q4_1), and x",
    "Q4_K": "(d*sc)*q - dmin*m rounded to bf16 (FMA as Q4_1), and x",
    "Q5_K": "(d*sc)*q - dmin*m rounded to bf16 (FMA as Q4_1), and x",
    "Q6_K": "(d*sc)*(q-32) rounded to bf16, and x",
}
MATMUL: dict[str, tuple[float, float, float, str]] = {
    fmt: (8 * _BF16_U, 2e-5, 1e-6, reason) for fmt, reason in _MATMUL_REASONS.items()
}

# The GEMM in the quant domain (MatmulConfig.quants): the weight's quants are exact in bf16 and
# only x is rounded, so it is compared with the reference of the bf16-rounded x, in float64.
# What is left is fp32 arithmetic: each group's dot of (128 + q) with x and the group sum of x,
# whose offset cancels against coef * sum(x) (a 4-bit quant's 128 + q is 8-16x its value), and
# the scaling. Bound: QUANTS_REL * (|x| @ |W|^T) + 1e-6; measured under the interpreter (M = 5..33,
# K = 512..768) at most 6.4e-7 (Q4_0) relative, 1.4e-7 Q6_K, 2.6e-8 Q8_0. 2^-16 keeps a 24x margin
# and stays below what rounding the weight to bf16 costs (about 2^-9 / sqrt(K) of |x| @ |W|).
QUANTS_REL = 2.0**-16

# Prompt flash attention (kiln/kernels/flash_attention.py), by cache dtype: (rtol, atol, reason).
# An output of query t, head h passes when |y - r| <= atol + rtol * (1 + S) * sum_j w_j |v_j|
# (tests/kernels/test_flash_attention.py), S = max_j scale * sum_d |q_d k_jd| over the keys t sees
# (natural-log units), w the reference softmax weights. For an f16/bf16 cache the MMAs take q and
# the softmax weights p rounded to the cache dtype (unit roundoff u: bf16 2^-8, f16 2^-11), as
# FlashAttention does: rounding q moves each score by up to u * S, so each weight by a factor
# within exp(+-2 u S), an error up to 2 u S exp(2 u S) * sum_j w_j |v_j|; rounding p (the
# numerator only: the row sums l add the fp32 p) adds u * sum_j w_j |v_j|. rtol = 2.5 u covers
# both while exp(2 u S) <= 1.25 (bf16: S <= 28; f16: S <= 228; the tests' random q, k at
# D <= 128 give S < 12), plus the fp32 part as for an f32 cache. Measured on the tests' inputs
# under the interpreter (normalized error): f32 1.2e-7, f16 1.0e-4, bf16 1.2e-3.
FLASH_ATTENTION: dict[torch.dtype | str, tuple[float, float, str]] = {
    torch.float32: (
        5e-6,
        1e-6,
        "fp32 MMAs (ieee) of exact operands; fp32 scores and sums in another order (blocks of "
        "keys) and exp2 of log2(e)-prescaled scores (ex2.approx: 2 ulp) against torch's exp",
    ),
    torch.float16: (
        2.5 * 2**-11 + 5e-6,
        1e-6,
        "q and p rounded to f16 for the tensor cores (u = 2^-11): 2.5 u, see above; + float32's",
    ),
    torch.bfloat16: (
        2.5 * 2**-8 + 5e-6,
        1e-6,
        "q and p rounded to bf16 for the tensor cores (u = 2^-8): 2.5 u, see above; + float32's",
    ),
    "blocks as f16": (
        4 * 2**-11 + 5e-6,
        1e-6,
        "q8_0 / q4_0 values, q and p rounded to f16 (u = 2^-11): 2 u S in the scores moves the "
        "weights by up to 4 u S, p and V add 2 u; + float32's",
    ),
}


def rotated_bound(bound: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """The bound of an output rotated after its error arose (kiln/quant/kv.py's 64 x 64
    Hadamard matrix / 8, on each 64 values of the last axis), from the elementwise `bound` of
    its error before and the magnitudes `mag` of the values rotated: H e moves each value by at
    most sum|e| / 8 over its 64, and the rotation's own fp32 sums (six butterfly stages in the
    kernels, a mat-mul in the reference) add about 1e-6 of sum|x| / 8."""
    return (_block_sums(bound) + 1e-6 * _block_sums(mag)) / 8


def _block_sums(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] with each 64 values replaced by their sum (the reach of a 64 x 64 rotation)."""
    blocks = x.reshape(*x.shape[:-1], -1, 64)
    return blocks.sum(-1, keepdim=True).expand_as(blocks).reshape(x.shape)

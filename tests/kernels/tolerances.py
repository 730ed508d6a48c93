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
    "Q4_0": "d * (q - 8) is one rounding as in the reference; summation order differs",
    "Q4_1": "d * q + m may be fused to one FMA (the reference rounds twice): 1 ulp per weight",
    "Q5_0": "d * (q - 16) is one rounding as in the reference; summation order differs",
    "Q5_1": "d * q + m may be fused to one FMA (the reference rounds twice): 1 ulp per weight",
    "Q4_K": "(d*sc)*q - dmin*m may be fused to one FMA: 1 ulp per weight; summation order",
    "Q5_K": "(d*sc)*q - dmin*m may be fused to one FMA: 1 ulp per weight; summation order",
    "Q6_K": "(d*sc)*(q-32) is rounded as in the reference; summation order differs",
}

MATVEC: dict[tuple[str, torch.dtype], tuple[float, float, str]] = {
    (fmt, act): (2e-5, 1e-6, reason) for fmt, reason in _REASONS.items() for act in _ACT
}

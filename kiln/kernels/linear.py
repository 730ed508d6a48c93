"""The one `linear` dispatch by M (rows) of the triton op set: the decode mat-vec at one row,
batch_method's for 2..matvec.MAX_M rows (batched decode), the quantized GEMM above it, or
dequant_matmul where the tuned table found it faster for this (format, N, K, M bucket) on this
GPU (kiln/kernels/matmul.py).

    linear(x: [M, K] or Activation, weight: Weight [N, K], bias: Weight [N] | None)
        -> [M, N] float32, or None

An Activation (the norm_quant fusion's output: kiln/quant/q8_1.py) is read in q8_1 by the int8
mat-vec where reads_q8_1 says so, as floats elsewhere. reads_q8_1 is also what the norm_quant op
asks, per consumer, to decide whether to quantize and whether to write the floats: one function,
so a consumer never finds the form it needs missing.

None means no kernel reads this weight (a format outside SUPPORT["matvec"] / SUPPORT["matmul"],
a stacked or merged-from-parts weight, x not 2-D): the caller runs the reference
(kiln.ops.reference.linear), which stays the spec. The choice depends on shapes, the format and
the device only (no host synchronization), so a step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.kernels import matmul, matmul_q8, matvec, matvec_q8, moe
from kiln.kernels.formats import SUPPORT
from kiln.quant.q8_1 import Activation
from kiln.weight import Weight

# What runs M = 2..matvec.MAX_M rows (batched decode) of float activations, by format and M:
# the one-row mat-vec once a row ("rows": M launches; each row's result has the bits of a batch
# of one) up to ROWS_UP_TO rows, the byte mat-vec ("matvec": one fp32 accumulator per row, the
# weight read once for all rows) below EXACT_FROM, the exact GEMM ("exact": tensor cores with
# fp32 tiles and tf32x3 products, 16 padded rows, split-K) from there. All are within a few fp32
# ulps of the reference. H100, session 11 (benchmarks/batched_linear.py, us per call; one row /
# byte mat-vec at 2, 4, 8 rows / exact at 8): Q4_K 24576 x 4096 36.3 / 101.8, 262.0, 470.9 /
# 316.9; 6144 x 4096 12.2 / 28.7, 70.4, 126.0 / 74.6; 4096 x 4096 8.8 / 23.4, 57.8, 86.5 / 51.8;
# Q6_K 4096 x 12288 28.4 / 68.5, 119.1, 144.8 / 100.8 (the exact GEMM is flat in M). So M
# one-row launches win up to 6 rows on Q4_K's shapes and 3 on Q6_K's, where the exact GEMM takes
# over. Other formats keep the byte mat-vec below 5 rows (qwen3-0.6b's Q8_0 shapes: it beats M
# one-row launches at 2 rows on three of four) and the exact GEMM from 5. `kiln bench -npl 4,8`
# on qwen3-8b Q4_K_M before "rows": 191.01 / 234.27 t/s with the byte mat-vec at every M,
# 187.88 / 370.23 with the exact GEMM.
_T = GGMLQuantizationType
FLOAT_BATCH = {_T.Q4_K: (6, 7), _T.Q6_K: (3, 4)}  # format: (ROWS_UP_TO, EXACT_FROM)
ROWS_UP_TO, EXACT_FROM = 1, 5  # the other formats'


def batch_method(m: int, qtype: GGMLQuantizationType) -> str:
    """What runs a float linear of 2..matvec.MAX_M rows of this format: "rows", "matvec" or
    "exact" (see FLOAT_BATCH)."""
    rows_up_to, exact_from = FLOAT_BATCH.get(qtype, (ROWS_UP_TO, EXACT_FROM))
    if m <= rows_up_to:
        return "rows"
    return "matvec" if m < exact_from else "exact"


# What reads a q8_1 Activation of 2..matvec.MAX_M rows: "matvec_q8" (the dp4a mat-vec) or
# "matmul_q8" (int8 tensor-core tiles, kiln/kernels/matmul_q8.py). H100, session 11
# (benchmarks/batched_linear.py, us, qwen3-8b's 24576 x 4096 Q4_K): at M = 8 matvec_q8 70.5 (its
# swept config; 188.7 with session 9's) against matmul_q8 197.9; `kiln bench -npl 8
# --fusion norm_quant=1` with session 9's mat-vec config 512.34 t/s against 428.94.
Q8_BATCH_METHOD = "matvec_q8"


def reads_q8_1(m: int, weight: Weight) -> bool:
    """Whether a linear of M rows with this weight reads its input in q8_1 (the int8 mat-vec)
    when the input offers it: decode batches (M <= matvec.MAX_M) of the formats it reads, at
    the row counts where it is the faster (matvec_q8.BF16_FASTER_UP_TO). An expert stack
    [n_expert, N, K] of a MoE layer of M tokens: where the layer runs the per-slot expert
    mat-vecs (M below moe.grouped_min_tokens, as the triton backend's moe_ffn decides) and the
    int8 one reads the format at one row a slot."""
    if len(weight.shape) == 3:
        return 1 <= m < moe.grouped_min_tokens(weight.device) and matvec_q8.reads(weight, 1)
    return 1 <= m <= matvec.MAX_M and matvec_q8.reads(weight, m)


def route(m: int, weight: Weight, device: torch.device | None = None) -> str | None:
    """What runs a linear of M rows with this weight: "matvec" (1 row), as batch_method says for
    2..8 rows ("rows", "matvec" or "exact": the GEMM in fp32), "triton" (the GEMM kernel),
    "dequant" (dequant_matmul), or None (no kernel reads it: the reference)."""
    if len(weight.shape) != 2 or weight.raw is None:
        return None
    if m <= matvec.MAX_M:
        if weight.qtype not in SUPPORT["matvec"]:
            return None
        return "matvec" if m == 1 else batch_method(m, weight.qtype)
    if weight.qtype not in SUPPORT["matmul"] or weight.qtype == GGMLQuantizationType.F32:
        # An F32 weight (a MoE router, small projections) keeps fp32 math above the mat-vec,
        # as llama.cpp's F32 mat-muls do: the GEMM's bf16 activations moved qwen3moe router
        # weights by 8e-4 relative at 9 rows (a tie between experts can flip), and the
        # reference's fp32 mat-mul reads the F32 blocks as they are (no dequantization).
        return None
    n, k = weight.shape
    return matmul.method(weight.qtype, n, k, m, device)


def linear(
    x: torch.Tensor | Activation, weight: Weight, bias: Weight | None = None, pdl: bool = False
) -> torch.Tensor | None:
    """x: [M, K] -> [M, N] float32 = x @ W.T (+ bias), or None where no kernel reads the weight
    (see the top). M = 0 gives an empty [0, N]."""
    if isinstance(x, Activation) and reads_q8_1(x.rows, weight):
        if x.rows > 1 and Q8_BATCH_METHOD == "matmul_q8" and matmul_q8.reads(weight):
            y = matmul_q8.matmul_q8(x.q8, weight, pdl=pdl)
        else:
            y = matvec_q8.matvec_q8(x.q8, weight, pdl=pdl)
        return y if bias is None else y + bias.dense()
    x = Activation.floats(x, weight.name)
    if x.dim() != 2:
        return None
    how = route(x.shape[0], weight, x.device)
    if how is None:
        return None
    if x.shape[0] == 0:
        y = torch.empty((0, weight.shape[0]), dtype=torch.float32, device=x.device)
    elif how == "matvec":
        y = matvec.matvec(x.contiguous(), weight, pdl=pdl)
    elif how == "rows":
        y = matvec.matvec_rows(x.contiguous(), weight, pdl=pdl)
    elif how == "exact":
        y = matmul.matmul(x, weight, exact=True, pdl=pdl)
    elif how == "dequant":
        y = matmul.dequant_matmul(x, weight, pdl=pdl)
    else:
        y = matmul.matmul(x, weight, pdl=pdl)
    return y if bias is None else y + bias.dense()

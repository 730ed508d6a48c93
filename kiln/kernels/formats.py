"""The one table of the kernels' formats: GGML type -> format id (the FMT constexpr of
kernels/triton/dequant.py) and which kernel reads which format.

    FORMAT_IDS[qtype] -> int              the id the kernels' FMT constexpr takes
    FLOAT_VIEW[qtype] -> torch.dtype      float formats: the typed view of raw the kernels read
    SUPPORT[kernel] -> frozenset[qtype]   the formats a kernel reads; supports(kernel, qtype)

Kernels (the keys of SUPPORT):
    "matvec"         kiln.kernels.matvec.matvec: _matvec_kernel, any M up to matvec.MAX_M
    "matvec_lanes"   its M = 1 kernel on integer views of the blocks (_matvec_lanes_m1_kernel),
                     taken where the format has one (kiln.kernels.matvec._WIDE says how it reads it)
    "matvec_q8"      kiln.kernels.matvec_q8.matvec_q8: x in q8_1, int8 dot products (M <= 8)
    "matmul_q8"      kiln.kernels.matmul_q8.matmul_q8: x in q8_1, int8 tensor-core tiles (any M)
    "expert_linear"  kiln.kernels.moe.expert_linear: the mat-vec kernels with EXPERTS on
    "matmul"         kiln.kernels.matmul: the quantized GEMM (M > matvec.MAX_M) and dequant_matmul
    "embedding"      kiln.kernels.embedding.embedding

Launchers assert against it; kiln/ops/triton_backend.py reads it to decide where a kernel runs.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.kernels.triton import dequant as _d

_T = GGMLQuantizationType

FORMAT_IDS: dict[GGMLQuantizationType, int] = {
    _T.F32: _d.F32.value,
    _T.F16: _d.F16.value,
    _T.BF16: _d.BF16.value,
    _T.Q8_0: _d.Q8_0.value,
    _T.Q4_0: _d.Q4_0.value,
    _T.Q4_1: _d.Q4_1.value,
    _T.Q5_0: _d.Q5_0.value,
    _T.Q5_1: _d.Q5_1.value,
    _T.Q4_K: _d.Q4_K.value,
    _T.Q5_K: _d.Q5_K.value,
    _T.Q6_K: _d.Q6_K.value,
}
FLOAT_VIEW: dict[GGMLQuantizationType, torch.dtype] = {
    _T.F32: torch.float32,
    _T.F16: torch.float16,
    _T.BF16: torch.bfloat16,
}

# Every format with an id is read by the kernels built on kernels/triton/dequant.py's helpers.
_DEQUANT = frozenset(FORMAT_IDS)
# The formats read with int8 dot products on q8_1 rows: both int8 kernels read all of them, so a
# q8_1 batch never lacks a kernel.
_INT8 = frozenset((_T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q5_K, _T.Q6_K))
SUPPORT: dict[str, frozenset[GGMLQuantizationType]] = {
    "matvec": _DEQUANT,
    "matvec_lanes": frozenset((_T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q6_K)),
    "matvec_q8": _INT8,
    "matmul_q8": _INT8,
    "expert_linear": _DEQUANT,
    "matmul": _DEQUANT,
    "embedding": _DEQUANT,
}


def supports(kernel: str, qtype: GGMLQuantizationType) -> bool:
    """Whether `kernel` (a key of SUPPORT) reads weights of type qtype."""
    return qtype in SUPPORT[kernel]


def format_id(qtype: GGMLQuantizationType) -> int:
    """The kernels' FMT id of qtype (KeyError for a format no kernel reads)."""
    return FORMAT_IDS[qtype]

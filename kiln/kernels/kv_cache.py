"""The KV pools the kernels read and write: a float tensor [S, Hkv, D] (f16, bf16, f32), or the
uint8 blocks of a block type (q8_0, q4_0: kiln/quant/kv.py's QuantizedRows, [S, Hkv, D / 32 *
block bytes]) that qkv_norm_rope quantizes rows into and the attention kernels dequantize
(kernels/triton/kv_cache.py).

    kv_operand(pool, n_kv, d, what) -> (the tensor a kernel takes, its K_FMT / V_FMT id, whether
                                        its rows are stored rotated: kiln/quant/kv.py)
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.kernels.triton import kv_cache as _k
from kiln.quant.kv import QuantizedRows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the kernels' K_FMT / V_FMT ids, as kernels/triton/kv_cache.py defines them
KV_FLOAT = _k.KV_FLOAT.value
BLOCK_IDS = {
    GGMLQuantizationType.Q8_0: _k.KV_Q8_0.value,
    GGMLQuantizationType.Q4_0: _k.KV_Q4_0.value,
}


def kv_operand(pool, n_kv: int, d: int, what: str) -> tuple[torch.Tensor, int, bool]:
    """The tensor a kernel reads for this pool and its format id, checked: [S, n_kv, d] values,
    heads packed, a contiguous last dim, any row stride (in elements of the tensor: bytes for a
    block type)."""
    if isinstance(pool, QuantizedRows):
        qtype = pool.type.qtype
        assert qtype in BLOCK_IDS, f"{what}: the kernels read q8_0 and q4_0 blocks; got {qtype}"
        data, row = pool.data, pool.type.row_bytes(d)
        assert pool.dim == d and tuple(data.shape[1:]) == (n_kv, row), (
            f"{what} holds [{data.shape[0]}, {data.shape[1]}] rows of {pool.dim} values in "
            f"{data.shape[2]} bytes; want [S, {n_kv}] of {d} values in {row}"
        )
        assert data.dtype == torch.uint8 and data.stride(2) == 1 and data.stride(1) == row, (
            f"{what} must be uint8 blocks with packed heads; strides {data.stride()}"
        )
        return data, BLOCK_IDS[qtype], pool.rotated
    assert pool.dim() == 3, f"{what} must be [S, Hkv, D]; got {tuple(pool.shape)}"
    assert pool.dtype in FLOAT_DTYPES, f"{what} must be f16/bf16/f32 or q8_0/q4_0; got {pool.dtype}"
    assert tuple(pool.shape[1:]) == (n_kv, d), (
        f"{what} is {tuple(pool.shape)}; want [S, {n_kv}, {d}]"
    )
    assert pool.stride(2) == 1 and pool.stride(1) == d, (
        f"{what} must have packed heads and a contiguous last dim; strides {pool.stride()}"
    )
    return pool, KV_FLOAT, False

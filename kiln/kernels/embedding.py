"""Launcher of the embedding-lookup kernel (kernels/triton/embedding.py): asserts, allocates, picks
the tile and the grid.

    embedding(weight: Weight [V, K], ids: int32/int64 [T] on the weight's device) -> [T, K] float32

Row t is weight row ids[t] dequantized, bit-exact with its reference
kiln.ops.reference.embedding(weight, ids) (= weight.rows(ids)): one launch instead of the
reference's gather and torch dequantization (~13-27 small torch kernels per decoded token,
~20-40 us on an H100). Launch parameters depend on shapes only, so it can be captured in a CUDA
graph.

ids must lie in [0, V): they are read on the device and not checked (an out-of-range id reads
outside the weight). The engine checks token ids on the host before they reach the device.
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES

from kiln.kernels import cdiv, next_power_of_2, pdl_launch
from kiln.kernels.formats import FLOAT_VIEW, FORMAT_IDS, SUPPORT
from kiln.kernels.triton import embedding as _k
from kiln.weight import Weight

_ID_DTYPES = (torch.int32, torch.int64)
# Values per program: a 4096-value row is 8 programs and a 1024-value one 2, each 4 values per
# thread over 4 warps (f32: one 16-byte load and store per thread). Untuned: at T = 1 the lookup
# reads one row (a few KB), so launch latency, not bandwidth, is its cost.
BLOCK_V = 512
NUM_WARPS = 4
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._embedding_kernel).__name__ == "InterpretedFunction"


def embedding(weight: Weight, ids: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """weight: Weight [V, K]; ids: [T] -> float32 [T, K], row t = dequantized weight row ids[t]."""
    assert len(weight.shape) == 2, f"embedding needs a 2-D [V, K] weight; got {weight.shape}"
    assert weight.qtype in SUPPORT["embedding"], f"embedding does not support {weight.qtype.name}"
    assert ids.dim() == 1 and ids.dtype in _ID_DTYPES, (
        f"ids must be a 1-D int32/int64 tensor of token ids; got {ids.dtype} {tuple(ids.shape)}"
    )
    assert ids.stride(0) == 1 or ids.shape[0] <= 1, "ids must be contiguous"
    assert ids.device == weight.device, f"ids on {ids.device}, weight on {weight.device}"
    v, k = weight.shape
    block_values, type_size = GGML_QUANT_SIZES[weight.qtype]
    raw = weight.raw
    assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride(1) == 1, (
        f"weight {weight.name}: raw must be uint8 [V, row_bytes] with unit last stride"
    )
    assert tuple(raw.shape) == (v, k // block_values * type_size) and k % block_values == 0, (
        f"weight {weight.name}: raw {tuple(raw.shape)} does not hold {weight.qtype.name} [{v}, {k}]"
    )
    t = ids.shape[0]
    out = torch.empty((t, k), dtype=torch.float32, device=ids.device)
    if t == 0 or k == 0:
        return out
    if weight.qtype in FLOAT_VIEW:
        dtype = FLOAT_VIEW[weight.qtype]
        size = dtype.itemsize
        assert raw.data_ptr() % size == 0 and raw.stride(0) % size == 0, (
            f"weight {weight.name}: {weight.qtype.name} rows must start on {size}-byte boundaries"
        )
        w = raw.view(dtype)  # [V, K] typed view of the same bytes
    else:
        w = raw
    block_v = max(block_values, min(BLOCK_V, next_power_of_2(k)))
    grid = (t, cdiv(k, block_v))
    _k._embedding_kernel[grid](
        ids,
        w,
        out,
        k,
        w.stride(0),
        FMT=FORMAT_IDS[weight.qtype],
        BLOCK_V=block_v,
        TYPE_SIZE=type_size,
        BLOCK_VALUES=block_values,
        num_warps=max(1, min(NUM_WARPS, block_v // 128)),
        # The reference rounds d * q + m (and (d * sc) * q - dmin * m) twice; an FMA would round
        # once and break bit-exactness. The kernel moves bytes, so the extra FMUL costs nothing.
        enable_fp_fusion=False,
        **pdl_launch(pdl),
    )
    return out

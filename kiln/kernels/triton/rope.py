"""Decode attention input in one kernel: Q/K head RMSNorm, RoPE, and the K/V cache write.

Program p owns head row j = p % (H + HKV) of token t = p // (H + HKV) (the order of a merged
QKV row): a query head (j < H) is normalized, rotated by positions[t] and written to q_out; a key
head is normalized, rotated and written to k_cache at row slots[t] (the token's row in the paged
KV pool, kiln/kernels/attention.py), and the program also copies value head j - H into v_cache
at the same row. A pool of a block type (q8_0, q4_0: K_FMT / V_FMT, kv_cache.py) gets the row
rotated (K_ROT / V_ROT, kiln/quant/kv.py) and quantized as ggml's reference quantizer does;
with K_ROT the query heads are written rotated too (q . k unchanged).
Positions and slots are read on the device, so a captured CUDA graph serves every step and
every block table.

RoPE as kiln.ops.reference.rope: dims d < ROT are rotated in pairs, NEOX=False pairs (2i, 2i+1),
NEOX=True pairs (i, i + ROT/2), by the angle pos * freqs[i] (fp32); dims d >= ROT are kept.
Each lane loads its own value and its pair partner's (a second load of the same row, from L1),
so no register shuffles are needed and any ROT <= D works.

Only @triton.jit functions live here; kiln/kernels/rope.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.kv_cache import KV_FLOAT, _head_ptr, _quantize_row, _rotate
from kiln.kernels.triton.norm import _rms_scale
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _to_cache(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even. bf16 is rounded by hand: Triton 3.6's
    interpreter truncates f32 -> bf16 while the GPU (and torch) round to nearest even."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # NaN and inf keep their class
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _norm_rope_row(src, w_ptr, d, partner, mask, rotated, cos, sin, D, eps, HAS_NORM: tl.constexpr):
    """One head row at src -> fp32 [BLOCK_D]: optional RMSNorm times w, then the rotation.
    sin is already negated on the first lane of each pair."""
    x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        scale = _rms_scale(x, D, eps)
        # (x * scale) * w as reference.rms_norm, for the lane's value and for its partner
        x = x * scale * tl.load(w_ptr + d, mask=mask, other=0.0)
        xp = xp * scale * tl.load(w_ptr + partner, mask=mask, other=0.0)
    return tl.where(rotated, x * cos + xp * sin, x)


@triton.jit
def _qkv_norm_rope_kernel(
    q_ptr,  # [T, H, D] f32/f16/bf16, token stride stride_qt, head stride D, unit stride along D
    k_ptr,  # [T, HKV, D], token stride stride_kt, head stride D
    v_ptr,  # [T, HKV, DV], token stride stride_vt, head stride DV
    qw_ptr,  # f32 [D] (read only when HAS_NORM)
    kw_ptr,  # f32 [D] (read only when HAS_NORM)
    pos_ptr,  # int64 [T]: rotation position of each token
    slot_ptr,  # int64 [T]: pool row of each token's K and V
    freq_ptr,  # f32 [ROT / 2]
    qo_ptr,  # f32 [T, H, D] contiguous
    kc_ptr,  # [S, HKV, D] f16/bf16/f32 pool, row stride stride_kc, head stride D; or K_FMT's
    vc_ptr,  # [S, HKV, DV] f16/bf16/f32 pool (row stride stride_vc) or V_FMT's uint8 blocks
    H,
    HKV,
    D,
    DV,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_kc,
    stride_vc,
    eps,
    ROT: tl.constexpr,  # rotated dims, even, <= D
    NEOX: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_DV: tl.constexpr,  # next power of two >= DV
    K_FMT: tl.constexpr = KV_FLOAT,  # k_cache: a float pool, or uint8 blocks (kv_cache.py)
    V_FMT: tl.constexpr = KV_FLOAT,
    K_ROT: tl.constexpr = False,  # a block-type row rotated before it is quantized
    V_ROT: tl.constexpr = False,
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    pid = tl.program_id(0)
    t = (pid // (H + HKV)).to(tl.int64)
    j = pid % (H + HKV)
    pos = tl.load(pos_ptr + t)  # int64 scalar

    d = tl.arange(0, BLOCK_D)
    mask = d < D
    rotated = d < ROT
    if NEOX:
        first = d < ROT // 2
        fi = tl.where(first, d, d - ROT // 2)
        partner = tl.where(first, d + ROT // 2, d - ROT // 2)
    else:
        first = (d % 2) == 0
        fi = d // 2
        partner = d ^ 1
    partner = tl.where(rotated, partner, d)
    freq = tl.load(freq_ptr + fi, mask=rotated, other=0.0)
    angle = pos.to(tl.float32) * freq  # as reference.rope: fp32 position times fp32 frequency
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    sin = tl.where(first, -sin, sin)  # (a, b) -> (a cos - b sin, b cos + a sin)

    # The compiler types a name once across both branches: each branch uses its own names.
    if j < H:
        q_src = q_ptr + t * stride_qt + j * D
        qy = _norm_rope_row(q_src, qw_ptr, d, partner, mask, rotated, cos, sin, D, eps, HAS_NORM)
        if K_ROT:  # q rotated as K is stored: q . k unchanged (kiln/quant/kv.py)
            qy = _rotate(qy, BLOCK_D)
        tl.store(qo_ptr + (t * H + j) * D + d, qy, mask=mask)
    else:
        hk = j - H
        slot = tl.load(slot_ptr + t)  # int64 scalar
        k_src = k_ptr + t * stride_kt + hk * D
        ky = _norm_rope_row(k_src, kw_ptr, d, partner, mask, rotated, cos, sin, D, eps, HAS_NORM)
        if K_FMT == KV_FLOAT:
            ky = _to_cache(ky, kc_ptr.dtype.element_ty)
            tl.store(kc_ptr + slot * stride_kc + hk * D + d, ky, mask=mask)
        else:  # the row quantized into its blocks (stride_kc in bytes)
            k_row = _head_ptr(kc_ptr + slot * stride_kc, hk, D, K_FMT)
            if K_ROT:
                ky = _rotate(ky, BLOCK_D)
            _quantize_row(k_row, ky, D, BLOCK_D, K_FMT)
        dv = tl.arange(0, BLOCK_DV)
        v_mask = dv < DV
        v = tl.load(v_ptr + t * stride_vt + hk * DV + dv, mask=v_mask, other=0.0)
        if V_FMT == KV_FLOAT:
            v = _to_cache(v.to(tl.float32), vc_ptr.dtype.element_ty)
            tl.store(vc_ptr + slot * stride_vc + hk * DV + dv, v, mask=v_mask)
        else:
            v_row = _head_ptr(vc_ptr + slot * stride_vc, hk, DV, V_FMT)
            v = v.to(tl.float32)
            if V_ROT:
                v = _rotate(v, BLOCK_DV)
            _quantize_row(v_row, v, DV, BLOCK_DV, V_FMT)

"""Launcher of the fused decode attention-input kernel (kernels/triton/rope.py): a drop-in
replacement of kiln.ops.reference.qkv_norm_rope.

    qkv_norm_rope(q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv], q_weight [D] | None,
                  k_weight [D] | None, eps, positions int64 [T], slots int64 [T],
                  freqs f32 [rot / 2], neox, k_cache [S, Hkv, D], v_cache [S, Hkv, Dv],
                  pdl=False) -> q f32 [T, H, D]

One launch over the T * (H + Hkv) head rows writes q and K roped at `positions`, and the K and
V rows into the cache pools at rows `slots` (each token's slot in the paged KV cache,
kiln/kernels/attention.py; distinct within a call). Both are read on the device: no host sync,
CUDA-graph safe. q, k, v may be views of a merged QKV result (any token stride, heads packed).
A cache pool may be a block type's QuantizedRows (q8_0, q4_0: kiln/kernels/kv_cache.py): its
rows are quantized in the kernel, the bytes kiln.quant.kv.write_rows writes.
"""

from __future__ import annotations

import torch

from kiln.kernels import next_power_of_2, pdl_launch
from kiln.kernels.kv_cache import KV_FLOAT, kv_operand
from kiln.kernels.norm import check_heads, num_warps_for, weight_f32
from kiln.kernels.triton import rope as _k
from kiln.quant.kv import QuantizedRows
from kiln.weight import Weight

MAX_D = 1024
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._qkv_norm_rope_kernel).__name__ == "InterpretedFunction"


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: Weight | None,
    k_weight: Weight | None,
    eps: float,
    positions: torch.Tensor,
    slots: torch.Tensor,
    freqs: torch.Tensor,
    neox: bool,
    k_cache: torch.Tensor | QuantizedRows,
    v_cache: torch.Tensor | QuantizedRows,
    pdl: bool = False,
) -> torch.Tensor:
    """Q/K head RMSNorm (when the weights are given), RoPE at positions, K and V written into the
    cache pools at rows slots -> q f32 [T, H, D] (rotated like K where K's pool stores its rows
    rotated, as kiln.ops.reference.qkv_norm_rope)."""
    check_heads(q, "qkv_norm_rope q")
    check_heads(k, "qkv_norm_rope k")
    check_heads(v, "qkv_norm_rope v")
    t, n_head, d = q.shape
    n_kv, dv = v.shape[1], v.shape[2]
    assert tuple(k.shape) == (t, n_kv, d), f"k is {tuple(k.shape)}; want {(t, n_kv, d)}"
    assert v.shape[0] == t, f"v is {tuple(v.shape)}; q has T={t}"
    assert d <= MAX_D and dv <= MAX_D, f"head sizes D={d}, Dv={dv} > {MAX_D}"
    dev = q.device
    assert k.device == dev and v.device == dev, f"q, k, v on {dev}, {k.device}, {v.device}"
    assert (q_weight is None) == (k_weight is None), "give both Q and K norm weights or neither"
    assert positions.shape == (t,) and positions.dtype == torch.int64, (
        f"positions must be int64 [T={t}]; got {positions.dtype} {tuple(positions.shape)}"
    )
    assert positions.device == dev, f"positions on {positions.device}, q on {dev}"
    assert slots.shape == (t,) and slots.dtype == torch.int64, (
        f"slots must be int64 [T={t}]; got {slots.dtype} {tuple(slots.shape)}"
    )
    assert slots.device == dev, f"slots on {slots.device}, q on {dev}"
    assert freqs.dim() == 1 and freqs.dtype == torch.float32 and freqs.is_contiguous(), (
        f"freqs must be a contiguous f32 [rot/2]; got {freqs.dtype} {tuple(freqs.shape)}"
    )
    assert freqs.device == dev, f"freqs on {freqs.device}, q on {dev}"
    rot = 2 * freqs.numel()
    assert 0 < rot <= d, f"rope rotates {rot} dims of heads of {d}"
    kc, k_fmt, k_rot = kv_operand(k_cache, n_kv, d, "k_cache")
    vc, v_fmt, v_rot = kv_operand(v_cache, n_kv, dv, "v_cache")
    assert kc.shape[0] == vc.shape[0], "k_cache and v_cache differ in rows"
    assert kc.device == dev and vc.device == dev, "caches must be on q's device"
    assert k_fmt == KV_FLOAT or d % 32 == 0, f"a block-type K cache needs D % 32 == 0; D={d}"
    assert v_fmt == KV_FLOAT or dv % 32 == 0, f"a block-type V cache needs Dv % 32 == 0; Dv={dv}"

    positions = positions.contiguous()
    slots = slots.contiguous()
    has_norm = q_weight is not None
    qw = weight_f32(q_weight, d, dev) if has_norm else freqs  # unread without HAS_NORM
    kw = weight_f32(k_weight, d, dev) if has_norm else freqs
    q_out = torch.empty((t, n_head, d), dtype=torch.float32, device=dev)
    if t == 0:
        return q_out
    block_d = next_power_of_2(d)
    _k._qkv_norm_rope_kernel[(t * (n_head + n_kv),)](
        q,
        k,
        v,
        qw,
        kw,
        positions,
        slots,
        freqs,
        q_out,
        kc,
        vc,
        n_head,
        n_kv,
        d,
        dv,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        kc.stride(0),
        vc.stride(0),
        eps,
        ROT=rot,
        NEOX=bool(neox),
        HAS_NORM=has_norm,
        BLOCK_D=block_d,
        BLOCK_DV=next_power_of_2(dv),
        K_FMT=k_fmt,
        V_FMT=v_fmt,
        K_ROT=k_rot,
        V_ROT=v_rot,
        num_warps=num_warps_for(max(block_d, next_power_of_2(dv))),
        **pdl_launch(pdl),
    )
    return q_out

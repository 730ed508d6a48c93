"""Launchers of the RMSNorm kernels (kernels/triton/norm.py): drop-in replacements of
kiln.ops.reference.rms_norm, add_rms_norm and qk_norm, with float32 outputs.

    rms_norm(x: [..., n], weight [n], eps) -> f32 [..., n]
    add_rms_norm(x: [..., n], residual: [..., n], weight [n], eps) -> (h, rms_norm(h)) f32,
        h = residual + x
    qk_norm(q: [T, H, D], k: [T, Hkv, D], q_weight [D], k_weight [D], eps) -> (q, k) f32
    rms_norm_quant(x: [R, n], weight [n], eps, residual=None, write_y=True)
        -> (h or None, y f32 or None, y in q8_1): the norm_quant fusion

One launch each, one program per row (qk_norm: per head row of q and k), the row in registers.
Launch parameters depend on shapes only (no host sync), so every launcher is CUDA-graph safe.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from kiln.kernels import next_power_of_2, pdl_launch
from kiln.kernels.triton import norm as _k
from kiln.quant.q8_1 import Q8_1, QK
from kiln.weight import Weight

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 16384  # the row lives in registers: 32 fp32 values per thread at 16 warps
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._rms_norm_kernel).__name__ == "InterpretedFunction"


def num_warps_for(block: int) -> int:
    """About 8 fp32 values per thread (two 16-byte loads), 1..16 warps: n = 4096 -> 16 warps,
    a head row of D = 128 -> 1 warp. Untuned."""
    return max(1, min(16, block // 256))


def weight_f32(weight: Weight, n: int, device: torch.device) -> torch.Tensor:
    """f32 [n] of a 1-D norm weight: a view of the GGUF bytes when F32 (the usual case), else the
    dequantized copy."""
    assert len(weight.shape) == 1, f"norm weight {weight.name} must be 1-D; got {weight.shape}"
    assert weight.shape[0] == n, f"norm weight {weight.name} has {weight.shape[0]} values, x {n}"
    assert weight.device == device, f"norm weight {weight.name} on {weight.device}, x on {device}"
    raw = weight.raw
    if weight.qtype == GGMLQuantizationType.F32 and raw.is_contiguous() and raw.data_ptr() % 4 == 0:
        w = raw.view(torch.float32)
    else:
        w = weight.dense().to(device=device, dtype=torch.float32).contiguous()
    assert w.shape == (n,), f"norm weight {weight.name}: {w.shape}"
    return w


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    """x: [..., n] -> a [R, n] view (a copy only when the leading dims cannot be flattened)."""
    assert x.dtype in _X_DTYPES, f"{what} must be f16/bf16/f32; got {x.dtype}"
    assert x.dim() >= 1 and x.shape[-1] > 0, f"{what} needs a non-empty last dim; got {x.shape}"
    assert x.stride(-1) == 1, f"{what} needs a contiguous last dim; got strides {x.stride()}"
    n = x.shape[-1]
    assert n <= MAX_N, f"{what}: rows of {n} > {MAX_N} values do not fit this kernel"
    return x.reshape(-1, n)


def rms_norm(x: torch.Tensor, weight: Weight, eps: float, pdl: bool = False) -> torch.Tensor:
    """x: [..., n] normalized over the last dimension, times weight [n] -> f32 [..., n]."""
    x2 = _rows(x, "rms_norm x")
    rows, n = x2.shape
    w = weight_f32(weight, n, x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    block = next_power_of_2(n)
    _k._rms_norm_kernel[(rows,)](
        x2,
        w,
        out,
        n,
        x2.stride(0),
        n,
        eps,
        BLOCK=block,
        num_warps=num_warps_for(block),
        **pdl_launch(pdl),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Weight, eps: float, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = residual + x, both f32 [..., n], in one launch."""
    assert x.shape == residual.shape, f"x {tuple(x.shape)} vs residual {tuple(residual.shape)}"
    assert x.device == residual.device, f"x on {x.device}, residual on {residual.device}"
    x2 = _rows(x, "add_rms_norm x")
    r2 = _rows(residual, "add_rms_norm residual")
    rows, n = x2.shape
    w = weight_f32(weight, n, x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if rows == 0:
        return h, out
    block = next_power_of_2(n)
    _k._add_rms_norm_kernel[(rows,)](
        x2,
        r2,
        w,
        h,
        out,
        n,
        x2.stride(0),
        r2.stride(0),
        eps,
        BLOCK=block,
        num_warps=num_warps_for(block),
        **pdl_launch(pdl),
    )
    return h, out


def check_heads(x: torch.Tensor, what: str) -> None:
    """x: [T, heads, D] with heads packed (stride D) and unit stride along D; any token stride
    (a view of a merged QKV result)."""
    assert x.dim() == 3, f"{what} must be [T, heads, D]; got {tuple(x.shape)}"
    assert x.dtype in _X_DTYPES, f"{what} must be f16/bf16/f32; got {x.dtype}"
    assert x.stride(2) == 1 or x.shape[2] == 1, f"{what}: last dim must be contiguous"
    assert x.stride(1) == x.shape[2] or x.shape[1] == 1, (
        f"{what}: heads must be packed (head stride {x.stride(1)} != D = {x.shape[2]}); "
        f"pass a view like qkv[:, :H*D].view(T, H, D)"
    )


def qk_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Weight,
    k_weight: Weight,
    eps: float,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] -> (q, k) f32 new tensors, each head row normalized over D
    times its weight [D]; one launch over the T * (H + Hkv) head rows."""
    check_heads(q, "qk_norm q")
    check_heads(k, "qk_norm k")
    t, n_head, d = q.shape
    assert k.shape[0] == t and k.shape[2] == d, f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert q.device == k.device, f"q on {q.device}, k on {k.device}"
    assert d <= MAX_N, f"qk_norm: head size {d} > {MAX_N}"
    n_kv = k.shape[1]
    qw = weight_f32(q_weight, d, q.device)
    kw = weight_f32(k_weight, d, q.device)
    q_out = torch.empty((t, n_head, d), dtype=torch.float32, device=q.device)
    k_out = torch.empty((t, n_kv, d), dtype=torch.float32, device=q.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    block = next_power_of_2(d)
    _k._qk_norm_kernel[(t * (n_head + n_kv),)](
        q,
        k,
        qw,
        kw,
        q_out,
        k_out,
        n_head,
        n_kv,
        d,
        q.stride(0),
        k.stride(0),
        eps,
        BLOCK_D=block,
        num_warps=num_warps_for(block),
        **pdl_launch(pdl),
    )
    return q_out, k_out


def rms_norm_quant(
    x: torch.Tensor,
    weight: Weight,
    eps: float,
    residual: torch.Tensor | None = None,
    write_y: bool = True,
    pdl: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, Q8_1]:
    """The norm_quant fusion: (h, y, y in q8_1) with h = residual + x (None without a residual),
    y = rms_norm(h or x) f32 (None unless write_y), in one launch. x, residual: [R, n], n a
    multiple of 32. Bit for bit the unfused form (rms_norm_quant_unfused)."""
    x2 = _rows(x, "norm_quant x")
    rows, n = x2.shape
    assert n % QK == 0, f"norm_quant: q8_1 rows are whole blocks of {QK} values; got {n}"
    r2 = x2
    if residual is not None:
        assert residual.shape == x.shape, f"x {tuple(x.shape)} vs residual {tuple(residual.shape)}"
        r2 = _rows(residual, "norm_quant residual")
    w = weight_f32(weight, n, x.device)
    h = (
        torch.empty((rows, n), dtype=torch.float32, device=x.device)
        if residual is not None
        else None
    )
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device) if write_y else None
    q = Q8_1.empty(rows, n, x.device)
    if rows == 0:
        return h, y, q
    block = next_power_of_2(n)
    _k._rms_norm_quant_kernel[(rows,)](
        x2,
        r2,
        w,
        h if h is not None else x2,
        y if y is not None else x2,
        q.qs,
        q.ds,
        n,
        x2.stride(0),
        r2.stride(0),
        eps,
        BLOCK=block,
        RESIDUAL=residual is not None,
        WRITE_Y=write_y,
        num_warps=num_warps_for(block),
        **pdl_launch(pdl),
    )
    return h, y, q


def rms_norm_quant_unfused(
    x: torch.Tensor,
    weight: Weight,
    eps: float,
    residual: torch.Tensor | None = None,
    write_y: bool = True,
    pdl: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, Q8_1]:
    """norm_quant's unfused form: the add_rms_norm (or rms_norm) launch, then the quantize
    launch on its float rows."""
    from kiln.kernels.quantize import quantize_q8_1  # it imports this module's row limits

    if residual is None:
        h, y = None, rms_norm(x, weight, eps, pdl=pdl)
    else:
        h, y = add_rms_norm(x, residual, weight, eps, pdl=pdl)
    return h, y if write_y else None, quantize_q8_1(y.reshape(-1, y.shape[-1]), pdl=pdl)

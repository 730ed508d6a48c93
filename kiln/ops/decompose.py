"""The unfused form of each fused op, built from the separate ops of the same op set (so on the
triton backend `add_rms_norm` off means a torch add plus the rms_norm kernel, not the reference).

Each returns what the fused op returns, computed in the order the reference spells out.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from kiln.ops import reference
from kiln.quant.kv import rotated_like, write_rows


def unfused(name: str, ops: SimpleNamespace) -> Callable:
    return _MAKERS[name](ops)


def _add_rms_norm(ops):
    def add_rms_norm(x, residual, weight, eps):
        h = residual + x
        return h, ops.rms_norm(h, weight, eps)

    return add_rms_norm


def _qk_norm(ops):
    def qk_norm(q, k, q_weight, k_weight, eps):
        return ops.rms_norm(q, q_weight, eps), ops.rms_norm(k, k_weight, eps)

    return qk_norm


def _qkv_norm_rope(ops):
    def qkv_norm_rope(
        q, k, v, q_weight, k_weight, eps, positions, slots, freqs, neox, k_cache, v_cache
    ):
        if q_weight is not None:
            q, k = ops.qk_norm(q, k, q_weight, k_weight, eps)
        q = ops.rope(q, positions, freqs, neox)
        k = ops.rope(k, positions, freqs, neox)
        write_rows(k_cache, slots, k)
        write_rows(v_cache, slots, v)
        return rotated_like(q, k_cache)

    return qkv_norm_rope


PARTS = {  # what the unfused form runs (kiln info)
    "add_rms_norm": "a torch add, then rms_norm",
    "qk_norm": "rms_norm twice",
    "qkv_norm_rope": "qk_norm, rope twice, two cache writes",
    "swiglu": "torch silu and mul",
}

_MAKERS = {
    "add_rms_norm": _add_rms_norm,
    "qk_norm": _qk_norm,
    "qkv_norm_rope": _qkv_norm_rope,
    "swiglu": lambda ops: reference.swiglu,  # torch's silu and mul on any backend
}

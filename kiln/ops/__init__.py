"""The public op API. A model holds an op set and calls only these ops; a backend ("torch": the
reference in reference.py; "triton": the GPU kernels in triton_backend.py; "cpu": quantized
weights on the CPU in cpu.py) provides each of them with the reference's signature, so any op
can be checked against its reference.

Fused ops (add_rms_norm, qk_norm, qkv_norm_rope, swiglu) are ops too. When a fusion is off, the op
set holds its decomposition into the backend's separate ops instead (decompose.py), so a model
makes the same calls either way and the two forms can be compared one fusion at a time.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from kiln.errors import UnsupportedError, UsageError
from kiln.ops import decompose, reference

OP_NAMES = (
    "embedding",
    "linear",
    "rms_norm",
    "add_rms_norm",
    "qk_norm",
    "qkv_norm_rope",
    "rope_frequencies",
    "rope",
    "attention",
    "attention_decode",
    "swiglu",
    "moe_route",
    "moe_ffn",
    "expert_linear",
    "moe_combine",
)
FUSED_OPS = ("add_rms_norm", "qk_norm", "qkv_norm_rope", "swiglu")  # each is also a fusion name
BACKEND_NAMES = ("torch", "triton", "cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    """ "auto": triton on a CUDA device, cpu on the CPU, torch (the reference) elsewhere;
    otherwise checked."""
    if backend == "auto":
        return {"cuda": "triton", "cpu": "cpu"}.get(device.type, "torch")
    if backend not in BACKEND_NAMES:
        raise UsageError(f"unknown backend {backend!r} (use auto, {', '.join(BACKEND_NAMES)})")
    if backend == "cpu" and device.type != "cpu":
        raise UsageError(
            f"the cpu backend runs on the CPU, not {device.type}: use --device cpu, or "
            f"--backend auto"
        )
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise UsageError(
            "the triton backend runs on a CUDA GPU (here: use --backend torch, or set "
            "TRITON_INTERPRET=1 to run the kernels slowly in Triton's interpreter)"
        )
    return backend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def base_ops(backend: str, pdl: bool = False) -> dict:
    """{op name: function} of a backend with every fusion on; pdl: the triton backend's kernels
    launched with programmatic dependent launch (the `pdl` fusion)."""
    if backend == "torch":
        return {n: getattr(reference, n) for n in OP_NAMES}
    if backend == "triton":
        from kiln.ops import triton_backend

        return triton_backend.ops(pdl)
    if backend == "cpu":
        from kiln.ops import cpu

        return cpu.ops()
    raise UnsupportedError(f"unknown backend {backend!r} (available: {', '.join(BACKEND_NAMES)})")


def get_ops(backend: str, fused: dict[str, bool] | None = None) -> SimpleNamespace:
    """The op set of a backend; fused[name] False puts the decomposition in place of that fused
    op (default: all fused); fused["pdl"] True launches the triton kernels with programmatic
    dependent launch (default: off)."""
    table = base_ops(backend, pdl=bool(fused and fused.get("pdl", False)))
    ops = SimpleNamespace(name=backend, **table)
    for name in FUSED_OPS:
        if fused is not None and not fused.get(name, True):
            setattr(ops, name, decompose.unfused(name, ops))
    return ops


__all__ = ["BACKEND_NAMES", "OP_NAMES", "get_ops", "resolve_backend"]

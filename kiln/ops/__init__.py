"""The public op API. A model holds an op set and calls only these ops; a backend ("torch": the
reference in reference.py; "triton": the GPU kernels in triton_backend.py; "cpu": quantized
weights on the CPU in cpu.py) provides each of them with the reference's signature, so any op
can be checked against its reference.

Fused ops (add_rms_norm, qk_norm, qkv_norm_rope, swiglu) are ops too. When a fusion is off, the op
set holds its decomposition into the backend's separate ops instead (decompose.py), so a model
makes the same calls either way and the two forms can be compared one fusion at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kiln.errors import UnsupportedError, UsageError
from kiln.kernels import interpreting
from kiln.ops import decompose

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
    "swiglu",
    "moe_route",
    "moe_ffn",
)
FUSED_OPS = ("add_rms_norm", "qk_norm", "qkv_norm_rope", "swiglu")  # each is also a fusion name
BACKEND_NAMES = ("torch", "triton", "cpu")


@dataclass(frozen=True)
class OpSet:
    """The ops a model calls, chosen once when the model is built: a backend's functions with
    the decompositions of the fusions that are off. `routes` says what runs each op (a kernel, a
    kernel up to some rows and the reference above, the reference): `kiln info` prints it."""

    name: str
    embedding: Callable
    linear: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    qk_norm: Callable
    qkv_norm_rope: Callable
    rope_frequencies: Callable
    rope: Callable
    attention: Callable
    swiglu: Callable
    moe_route: Callable
    moe_ffn: Callable
    routes: tuple[tuple[str, str], ...] = ()

    def route(self, op: str) -> str:
        return dict(self.routes).get(op, "reference")


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


def _backend(backend: str):
    if backend == "torch":
        from kiln.ops import reference as module
    elif backend == "triton":
        from kiln.ops import triton_backend as module
    elif backend == "cpu":
        from kiln.ops import cpu as module
    else:
        raise UnsupportedError(
            f"unknown backend {backend!r} (available: {', '.join(BACKEND_NAMES)})"
        )
    return module


def pack_for_kernel(backend: str, weights: dict, merge_groups: list[list[str]]) -> None:
    """Give the weights the backend's own forms, at load and before the model merges any
    (`merge_groups`: the weights it will merge, packed side by side). The blocks stay the
    reference: a packed weight's dense() equals the original's. Only the cpu backend packs."""
    module = _backend(backend)
    if hasattr(module, "pack_for_kernel"):
        module.pack_for_kernel(weights, merge_groups)


def loaded(backend: str) -> None:
    """The model is built: a backend may release what its load needed."""
    module = _backend(backend)
    if hasattr(module, "loaded"):
        module.loaded()


def check_kv_cache_types(backend: str, k_type, v_type) -> None:
    """UsageError when the backend's attention cannot read a K / V cache of these types
    (kiln.quant.kv.KVCacheType); the torch and cpu backends read every type."""
    module = _backend(backend)
    if hasattr(module, "check_kv_cache_types"):
        module.check_kv_cache_types(k_type, v_type)


def weight_fallbacks(backend: str, weights: dict) -> list[tuple[str, object]]:
    """(name, type) of the weights ({name: GGML type}) a backend's kernels do not read: they run
    the reference (a whole-weight dequantization per call). Decided by type alone."""
    module = _backend(backend)
    if not hasattr(module, "kernel_reads"):
        return []
    return [(n, t) for n, t in weights.items() if not module.kernel_reads(n, t)]


def get_ops(backend: str, fused: dict[str, bool] | None = None) -> OpSet:
    """The op set of a backend; fused[name] False puts the decomposition in place of that fused
    op (default: all fused); fused["pdl"] True launches the triton kernels with programmatic
    dependent launch (default: off); fused["moe_grouped"] False runs the triton backend's MoE
    prompts as one GEMM launch per expert instead of one per weight (default: on);
    fused["norm_quant"] True gives the triton backend's norms a `consumers` argument with which
    they quantize to q8_1 for the int8 mat-vecs (default: off; triton_backend.norm_quant).

    A backend module gives `ops(pdl) -> {op: function}` for every name of OP_NAMES, `ROUTES`
    ({op: what runs it}) and, where an op is built from others of the set (the triton
    backend's moe_ffn calls the set's swiglu), `compose(ops) -> {op: function}` run after the
    decompositions are in place."""
    module = _backend(backend)
    pdl = bool(fused and fused.get("pdl", False))
    table = module.ops(pdl=pdl)
    assert set(table) == set(OP_NAMES), f"{backend}: ops {sorted(set(OP_NAMES) ^ set(table))}"
    routes = dict(module.ROUTES)
    moe_grouped = not fused or fused.get("moe_grouped", True)
    norm_quant = bool(fused and fused.get("norm_quant", False))
    ops = SimpleNamespace(
        name=backend, pdl=pdl, moe_grouped=moe_grouped, norm_quant=norm_quant, **table
    )
    for name in FUSED_OPS:
        if fused is not None and not fused.get(name, True):
            setattr(ops, name, decompose.unfused(name, ops))
            routes[name] = f"unfused: {decompose.PARTS[name]}"
    if hasattr(module, "compose"):
        for name, fn in module.compose(ops).items():
            setattr(ops, name, fn)
    if norm_quant:
        routes.update(getattr(module, "NORM_QUANT_ROUTES", {}))
    return OpSet(
        name=backend,
        routes=tuple((n, routes.get(n, "reference")) for n in OP_NAMES),
        **{n: getattr(ops, n) for n in OP_NAMES},
    )


__all__ = [
    "BACKEND_NAMES",
    "OP_NAMES",
    "OpSet",
    "check_kv_cache_types",
    "get_ops",
    "resolve_backend",
]

"""The public op API. A model holds an OpSet and calls only these ops; a backend ("torch" is the
reference in reference.py; GPU kernels register their own) provides each of them with the same
signature, so any op can be checked against its reference."""

from __future__ import annotations

from types import SimpleNamespace

from kiln.errors import UnsupportedError
from kiln.ops import reference
from kiln.ops.weight import Weight

OP_NAMES = (
    "embedding",
    "linear",
    "rms_norm",
    "add_rms_norm",
    "rope_frequencies",
    "rope",
    "attention",
    "swiglu",
    "moe_route",
    "moe_ffn",
)

BACKENDS: dict[str, SimpleNamespace] = {
    "torch": SimpleNamespace(name="torch", **{n: getattr(reference, n) for n in OP_NAMES})
}


def get_ops(backend: str) -> SimpleNamespace:
    """The op set of a backend ("torch": the reference, any device)."""
    if backend not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise UnsupportedError(f"unknown backend {backend!r} (available: {known})")
    return BACKENDS[backend]


__all__ = ["BACKENDS", "OP_NAMES", "Weight", "get_ops"]

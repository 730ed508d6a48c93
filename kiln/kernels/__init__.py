"""Triton kernel launchers: each asserts layout and dtype, allocates, picks config and grid.

Measured per-GPU data (tuned launch configs, fusion defaults) lives in kernels/configs as
`<what>,device=<gpu>.json`; `config_name` is the one naming function its writers and readers use.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def interpreting() -> bool:
    """Triton's interpreter runs the kernels (TRITON_INTERPRET set and not 0): on a CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints: triton.cdiv is a constexpr function whose every call from the
    host unwraps its arguments (about 4 us: launchers call it on every launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0), as triton.next_power_of_2, at host cost."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def config_name(what: str, device_name: str) -> str:
    """e.g. ("matvec", "NVIDIA H100 80GB HBM3") -> "matvec,device=NVIDIA_H100_80GB_HBM3.json"."""
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name)
    return f"{what},device={safe}.json"


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """The launch arguments of a kernel with programmatic dependent launch on or off
    (kiln/kernels/triton/pdl.py): the PDL constexpr (its wait) and Triton's launch_pdl. Always
    off under TRITON_INTERPRET=1: the interpreter cannot run the griddepcontrol instructions."""
    on = bool(pdl) and not interpreting()
    return {"PDL": on, "launch_pdl": on}

"""Programmatic dependent launch (the `pdl` fusion; Hopper and newer).

A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream is
still running: its programs are scheduled as soon as every program of the one before has started
(each signals `griddepcontrol.launch_dependents` right after its own wait), which hides the launch
latency and the ramp of a new grid behind the tail of the previous one. In exchange the kernel
must not touch memory that an earlier kernel writes or reads before `griddepcontrol.wait`, which
returns once the kernel before has completed and its writes are visible.

Every kernel of the decode step calls `wait_for_inputs()` first, in every program, before any
load or store. That keeps the usual stream order for everything: a kernel cannot complete before
the one before it has (it waits for it), so waiting on the immediate predecessor also covers all
earlier kernels, and kernels launched without the attribute (torch's) wait for full completion
as always.

Only @triton.jit functions live here; the launchers pass PDL and launch_pdl
(kiln.kernels.pdl_launch).
"""

from __future__ import annotations

import triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_inputs():
    """Wait for the kernel before to complete, then let the next one be scheduled."""
    gdc_wait()
    gdc_launch_dependents()

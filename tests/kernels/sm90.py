"""Compile kernels for an H100 (sm_90) on a machine without a GPU.

Under `compile_only()`, every @triton.jit launch compiles the kernel for sm_90 down to a cubin
(Triton's own ptxas) instead of running it, so CI catches what the interpreter accepts but the
real compiler rejects (constexpr misuse, dtype mismatches, too much shared memory) and reports
each kernel's cubin and shared-memory size. Launchers run unchanged on CPU tensors: only
pointers' dtypes and alignment reach the compiler. Run it in a subprocess without
TRITON_INTERPRET (see run_compile_check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator

SM90 = ("cuda", 90, 32)


@dataclasses.dataclass(frozen=True)
class Compiled:
    kernel: str
    cubin_bytes: int
    shared_bytes: int
    launch_pdl: bool  # launched with programmatic dependent launch
    waits: bool  # its PTX has griddepcontrol.wait (kiln/kernels/triton/pdl.py)
    maxnreg: int | None = None  # the register cap its PTX gives ptxas (.maxnreg), if any


class _Sm90Driver:
    """The three things JITFunction.run asks the driver for, answered for an H100."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*SM90)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


def _maxnreg(ptx: str) -> int | None:
    m = re.search(r"\.maxnreg\s+(\d+)", ptx)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def compile_only() -> Iterator[list[Compiled]]:
    """Inside: launches compile for sm_90 and do not run; yields the list of what compiled."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET first"
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    done: list[Compiled] = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        meta = kernel.metadata
        done.append(
            Compiled(
                self.fn.__name__,
                len(kernel.asm["cubin"]),
                meta.shared,
                bool(meta.launch_pdl),
                "griddepcontrol.wait" in kernel.asm["ptx"],
                _maxnreg(kernel.asm["ptx"]),
            )
        )
        return kernel

    driver.set_active(_Sm90Driver())
    JITFunction.run = compile_instead
    try:
        yield done
    finally:
        JITFunction.run = run
        driver._active = None  # the default (CUDA) driver is looked up again when next needed


def run_compile_check(code: str, timeout: float = 600) -> str:
    """Run `code` (which uses `compile_only`) in a fresh interpreter without TRITON_INTERPRET;
    returns its stdout, fails with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, f"sm_90 compile check failed:\n{r.stderr[-4000:]}"
    return r.stdout

"""kiln.kernels.activation.swiglu against kiln.ops.reference.swiglu.

On the CPU this runs through Triton's interpreter (tests/kernels/conftest.py) on small shapes; on
a GPU the same cases add real FFN widths (up to qwen3-32B's 25600) and T = 512.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.ops import reference
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import DECODE_FUSIONS

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
ACTS = (torch.float32, torch.float16, torch.bfloat16)

# (T, F): odd F, F over several column blocks with a ragged last one; real widths on a GPU.
SHAPES = [(1, 33), (3, 3000), (2, 1024)]
if CUDA:
    SHAPES += [(1, 1536), (1, 8192), (1, 11008), (1, 25600), (512, 3072), (5, 17408)]


def _kernels():
    from kiln.kernels import activation

    if not CUDA and not activation._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return activation


def _cases(t: int, f: int, dtype: torch.dtype, gen: torch.Generator):
    """(layout, gate, up): separate contiguous tensors, and the two column halves of a merged
    gate/up result [T, 2F] (row stride 2F)."""
    merged = (4 * torch.randn(t, 2 * f, generator=gen)).to(dtype).to(DEVICE)
    yield "merged", merged[:, :f], merged[:, f:]
    gate = (4 * torch.randn(t, f, generator=gen)).to(dtype).to(DEVICE)
    up = torch.randn(t, f, generator=gen).to(dtype).to(DEVICE)
    yield "separate", gate, up


@pytest.mark.parametrize("act", ACTS, ids=lambda d: str(d).removeprefix("torch."))
def test_swiglu_matches_reference(act: torch.dtype) -> None:
    activation = _kernels()
    rtol, atol, _reason = DECODE_FUSIONS["swiglu"]
    gen = torch.Generator().manual_seed(31)
    for t, f in SHAPES:
        for layout, gate, up in _cases(t, f, act, gen):
            y = activation.swiglu(gate, up)
            ref = reference.swiglu(gate, up)
            _check(y, ref, atol + rtol * ref.abs(), f"swiglu {act} {layout} T={t} F={f}")
            assert y.is_contiguous()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter
def test_swiglu_extremes() -> None:
    """Very negative gates (exp(-g) overflows to inf: silu -> -0) and large positive ones."""
    activation = _kernels()
    gate = torch.tensor([[-1000.0, -100.0, -88.0, -20.0, 0.0, 20.0, 100.0, 3e38]], device=DEVICE)
    up = torch.full_like(gate, 0.5)
    y = activation.swiglu(gate, up)
    ref = reference.swiglu(gate, up)
    rtol, atol, _reason = DECODE_FUSIONS["swiglu"]
    _check(y, ref, atol + rtol * ref.abs(), "swiglu extremes")


def test_swiglu_rejects_bad_input() -> None:
    activation = _kernels()
    with pytest.raises(AssertionError, match="gate"):
        activation.swiglu(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous last dim"):
        activation.swiglu(torch.zeros(8, 2, device=DEVICE).T, torch.zeros(2, 8, device=DEVICE))


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from kiln.kernels import activation
from tests.kernels.sm90 import compile_only

with compile_only() as done:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        gu = torch.zeros(1, 2 * 25600, dtype=dt)  # qwen3-32B, merged gate/up
        activation.swiglu(gu[:, :25600], gu[:, 25600:])
    gu = torch.zeros(3, 2 * 1536)  # smollm2: 1536
    activation.swiglu(gu[:, :1536], gu[:, 1536:])
    activation.swiglu(torch.zeros(1, 33), torch.zeros(1, 33))  # one warp, masked
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_swiglu_kernel_compiles_for_sm90() -> None:
    """Every launched variant compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_swiglu_kernel") == 5, out
    print(out)

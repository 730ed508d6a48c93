"""kiln.kernels.matvec against kiln.ops.reference.linear on random inputs and real quantization.

On the CPU this runs through Triton's interpreter (tests/kernels/conftest.py) on tiny shapes; on
a GPU the same cases run on real shapes, including one 4096 x 4096 weight.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.ops.reference import linear
from kiln.ops.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.tolerances import MATVEC

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ACTS = (torch.float32, torch.float16, torch.bfloat16)


def _shapes(block: int) -> list[tuple[int, int, int]]:
    """(M, N, K): M = 1 and 3, odd N, K as the block size allows; big ones on a GPU only."""
    k_odd = 511 if block == 1 else 3 * block  # 511 only where the format allows it
    shapes = [(1, 33, k_odd), (3, 33, k_odd), (8, 5, 2 * block if block > 1 else 64)]
    if CUDA:
        shapes += [(1, 4096, 4096), (1, 257, 11008 // block * block), (8, 33, 4096)]
    return shapes


def _weight(fmt: str, n: int, k: int, gen: torch.Generator) -> Weight:
    qtype = GGMLQuantizationType[fmt]
    dense = torch.randn(n, k, generator=gen)
    raw = quant.quantize(dense, qtype).to(DEVICE)
    return Weight(f"w_{fmt}", qtype, (n, k), raw)


def _check(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    assert y.shape == ref.shape and y.dtype == torch.float32, f"{what}: {y.shape} {y.dtype}"
    err = (y - ref).abs()
    bad = ~(err <= bound)  # NaN in y counts as a mismatch
    if bad.any():
        worst = int(torch.nan_to_num(err - bound, nan=float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), y.shape))
        nonfinite = int((~torch.isfinite(y)).sum())
        pytest.fail(
            f"{what}: {int(bad.sum())} of {y.numel()} mismatch; worst at {idx}: "
            f"got {y[idx].item()!r}, want {ref[idx].item()!r} (bound {bound[idx].item():.3g}); "
            f"{nonfinite} NaN/inf in the output"
        )


def _kernel():
    from kiln.kernels import matvec as launcher

    if not CUDA and not launcher._INTERPRETED:
        pytest.skip("the kernel was compiled before TRITON_INTERPRET=1 was set (no CUDA here)")
    return launcher


@pytest.mark.parametrize("act", ACTS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_matches_reference(fmt: str, act: torch.dtype) -> None:
    launcher = _kernel()
    rtol, atol, _reason = MATVEC[(fmt, act)]
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(1234)
    for m, n, k in _shapes(block):
        w = _weight(fmt, n, k, gen)
        x = torch.randn(m, k, generator=gen).to(act).to(DEVICE)
        y = launcher.matvec(x, w)
        dense = w.dense()
        ref = linear(x.float(), w)
        bound = atol + rtol * (x.float().abs() @ dense.abs().T)
        _check(y, ref, bound, f"{fmt} x:{act} M={m} N={n} K={k}")


def test_matvec_rejects_bad_input() -> None:
    launcher = _kernel()
    gen = torch.Generator().manual_seed(0)
    w = _weight("Q8_0", 4, 64, gen)
    with pytest.raises(AssertionError, match="K=32"):
        launcher.matvec(torch.zeros(1, 32, device=DEVICE), w)
    with pytest.raises(AssertionError, match="1..8"):
        launcher.matvec(torch.zeros(9, 64, device=DEVICE), w)
    with pytest.raises(AssertionError, match="contiguous"):
        launcher.matvec(torch.zeros(64, 2, device=DEVICE).T, w)


@pytest.mark.parametrize("join", (True, False), ids=("join", "strided"))
@pytest.mark.parametrize("tile", (32, 256, 512, 1024))
@pytest.mark.parametrize("fmt", ("Q8_0", "Q4_K", "Q6_K"))
def test_matvec_wide_kernels(fmt: str, tile: int, join: bool, monkeypatch) -> None:
    """The M = 1 integer-view kernels over several blocks per step, including a ragged last step
    (3 blocks), against the reference and against the byte kernel (USE_WIDE off)."""
    launcher = _kernel()
    monkeypatch.setattr(launcher, "WIDE_JOIN", join)
    rtol, atol, _reason = MATVEC[(fmt, torch.float16)]
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(7)
    n, k = 19, 3 * block
    w = _weight(fmt, n, k, gen)
    assert launcher._aligned(w.raw, launcher._WIDE[w.qtype][1].itemsize)
    x = torch.randn(1, k, generator=gen).to(torch.float16).to(DEVICE)
    cfg = launcher.MatvecConfig(block_n=8, tile_values=tile, num_warps=4)
    y = launcher.matvec(x, w, cfg)
    ref = linear(x.float(), w)
    bound = atol + rtol * (x.float().abs() @ w.dense().abs().T)
    _check(y, ref, bound, f"{fmt} wide tile={tile}")
    launcher.USE_WIDE = False
    try:
        y_bytes = launcher.matvec(x, w, cfg)
    finally:
        launcher.USE_WIDE = True
    _check(y, y_bytes, bound, f"{fmt} wide vs byte kernel tile={tile}")


# Every plain mat-vec kernel variant for an H100 (sm_90): each format at M = 1 (the integer-view
# kernels for Q8_0, Q4_K, Q6_K) and on the byte kernel (USE_WIDE off), M = 3 on two formats, a
# K that is no multiple of 16 super-block words (11008: Q4_K's row stride 1548 words).
_COMPILE = textwrap.dedent(
    """
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from kiln.kernels import matvec
    from kiln.ops.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, n, k):
        bv, ts = GGML_QUANT_SIZES[q]
        return Weight("w", q, (n, k), torch.empty(n, k // bv * ts, dtype=torch.uint8))

    runs = [(q, True, 1, 4096) for q in matvec.SUPPORTED]
    runs += [(q, False, 1, 4096) for q in matvec._WIDE]
    runs += [(T.Q4_K, True, 3, 4096), (T.Q8_0, True, 3, 4096), (T.Q4_K, True, 1, 11008)]
    with compile_only() as done:
        for q, wide, m, k in runs:
            matvec.USE_WIDE = wide
            matvec.matvec(torch.empty(m, k, dtype=torch.float16), weight(q, 4096, k))
            print(q.name, wide, m, k, done[-1].kernel)
    """
)


def test_matvec_compiles_for_sm90() -> None:
    from kiln.kernels.matvec import SUPPORTED

    out = run_compile_check(_COMPILE)
    wide = {"Q4_K": "_matvec_q4_k_m1_kernel", "Q6_K": "_matvec_q6_k_m1_kernel"}
    wide["Q8_0"] = "_matvec_q8_0_m1_kernel"
    lines = [line.split() for line in out.splitlines()]
    assert len(lines) == len(SUPPORTED) + 3 + 3, out
    for fmt, use_wide, m, _k, kernel in lines:
        want = wide.get(fmt) if use_wide == "True" and m == "1" else None
        assert kernel == (want or "_matvec_kernel"), f"{fmt} M={m} compiled {kernel}"

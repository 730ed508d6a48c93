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
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.tolerances import MATVEC

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ACTS = (torch.float32, torch.float16, torch.bfloat16)
# The M = 1 integer-view kernel of each format that has one (kiln.kernels.matvec._WIDE); every
# other launch runs _matvec_kernel.
WIDE = {
    "Q8_0": "_matvec_lanes_m1_kernel",
    "Q4_0": "_matvec_lanes_m1_kernel",
    "Q4_1": "_matvec_lanes_m1_kernel",
    "Q5_0": "_matvec_lanes_m1_kernel",
    "Q5_1": "_matvec_lanes_m1_kernel",
    "Q4_K": "_matvec_lanes_m1_kernel",
    "Q6_K": "_matvec_lanes_m1_kernel",
}
# The formats of _matvec_lanes_m1_kernel and its lanes (threads) a block.
LANES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
QW = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 4, "Q5_1": 2, "Q4_K": 16, "Q6_K": 8}


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
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return launcher


def record_launches(monkeypatch) -> list[tuple[str, dict]]:
    """From now on (to the end of the test), every launch of a mat-vec kernel appends (kernel
    name, its upper-case constexpr arguments) to the returned list."""
    from kiln.kernels.triton import matvec as kernels

    cls = type(kernels._matvec_kernel)  # InterpretedFunction on the CPU, JITFunction on a GPU
    run = cls.run
    launched: list[tuple[str, dict]] = []

    def recording(self, *args, **kwargs):
        launched.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k.isupper()}))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording)
    return launched


@pytest.mark.parametrize("act", ACTS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_matches_reference(fmt: str, act: torch.dtype, monkeypatch) -> None:
    launcher = _kernel()
    launched = record_launches(monkeypatch)
    rtol, atol, _reason = MATVEC[(fmt, act)]
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(1234)
    for m, n, k in _shapes(block):
        w = _weight(fmt, n, k, gen)
        x = torch.randn(m, k, generator=gen).to(act).to(DEVICE)
        y = launcher.matvec(x, w)
        want = WIDE.get(fmt, "_matvec_kernel") if m == 1 else "_matvec_kernel"
        assert launched[-1][0] == want, f"{fmt} M={m}: ran {launched[-1][0]}, not {want}"
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


def _wide_vs_byte(launcher, w: Weight, x: torch.Tensor, cfg, launched: list, what: str) -> dict:
    """The M = 1 integer-view kernel of w's format on x [1, K] against the reference, and the
    byte kernel (USE_WIDE off) against both; returns the constexprs of the wide launch."""
    fmt = w.qtype.name
    rtol, atol, _reason = MATVEC[(fmt, x.dtype)]
    y = launcher.matvec(x, w, cfg)
    name, mode = launched[-1]
    assert name == WIDE[fmt], f"{what}: ran {name}"
    ref = linear(x.float(), w)
    bound = atol + rtol * (x.float().abs() @ w.dense().abs().T)
    _check(y, ref, bound, f"{what}")
    launcher.USE_WIDE = False
    try:
        y_bytes = launcher.matvec(x, w, cfg)
    finally:
        launcher.USE_WIDE = True
    assert launched[-1][0] == "_matvec_kernel", f"{what}: USE_WIDE off ran {launched[-1][0]}"
    _check(y_bytes, ref, bound, f"{what}: byte kernel")
    _check(y, y_bytes, bound, f"{what}: wide vs byte kernel")
    return mode


@pytest.mark.parametrize("tile", (32, 256, 512, 1024))
@pytest.mark.parametrize("fmt", ("Q8_0", "Q4_K", "Q6_K"))
def test_matvec_wide_kernels(fmt: str, tile: int, monkeypatch) -> None:
    """The M = 1 integer-view kernels over several blocks per step, including a ragged last step
    (3 blocks), against the reference and against the byte kernel (USE_WIDE off)."""
    launcher = _kernel()
    launched = record_launches(monkeypatch)
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(7)
    n, k = 19, 3 * block
    w = _weight(fmt, n, k, gen)
    assert launcher._aligned(w.raw, launcher._WIDE[w.qtype].view.itemsize)
    x = torch.randn(1, k, generator=gen).to(torch.float16).to(DEVICE)
    cfg = launcher.MatvecConfig(block_n=8, tile_values=tile, num_warps=4)
    _wide_vs_byte(launcher, w, x, cfg, launched, f"{fmt} wide tile={tile}")


# (N, blocks of K, block_n, tile_values, num_warps): _matvec_lanes_m1_kernel's tilings (see
# test_matvec_lanes_tilings). 32-value blocks: a step that overruns K (S = 4 tiles 3 blocks), one
# block (S = 1), R tiles a step (Q4_x, Q5_0: S = 8 and R = 4; Q5_1: S = 16 and R = 2) over 2 even
# steps or 2 steps whose second overruns K (one tile partly, the others wholly past K), 3 even
# steps with 16 rows a program. Q4_K and Q6_K (256-value blocks, 16 and 8 lanes each): the same
# situations with R = 4 and 2 (one warp, 8 blocks a step) and R = 1 (two warps, 2 blocks a step).
LANES_CASES = {
    32: [(9, 3, 8, 1024, 4), (5, 1, 4, 1024, 1), (7, 64, 4, 1024, 1), (19, 40, 8, 1024, 1),
         (33, 24, 16, 256, 2)],
    256: [(9, 3, 8, 2048, 4), (5, 1, 4, 1024, 1), (7, 16, 4, 2048, 1), (19, 10, 8, 2048, 1),
          (33, 6, 16, 512, 2)],
}  # fmt: skip


def _block(fmt: str) -> int:
    return quant.get_format(fmt).block_size


@pytest.mark.parametrize(
    "fmt,case",
    [(f, c) for f in LANES for c in LANES_CASES[_block(f)]],
    ids=lambda v: v if isinstance(v, str) else "N{}_B{}_{}_{}_{}".format(*v),
)
def test_matvec_lanes_kernel(fmt: str, case: tuple, monkeypatch) -> None:
    """_matvec_lanes_m1_kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K at M = 1) on each tiling of
    LANES_CASES against the reference and the byte kernel; x in every activation dtype over
    the cases."""
    launcher = _kernel()
    launched = record_launches(monkeypatch)
    n, blocks, block_n, tile, warps = case
    block = _block(fmt)
    gen = torch.Generator().manual_seed(blocks)
    w = _weight(fmt, n, block * blocks, gen)
    act = ACTS[LANES_CASES[block].index(case) % len(ACTS)]
    x = torch.randn(1, block * blocks, generator=gen).to(act).to(DEVICE)
    cfg = launcher.MatvecConfig(block_n=block_n, tile_values=tile, num_warps=warps)
    mode = _wide_vs_byte(launcher, w, x, cfg, launched, f"{fmt} {case} x:{act}")
    want = launcher._lanes_tiling(block * blocks, w.qtype, cfg)
    assert {k: mode[k] for k in want} == want, mode


def test_matvec_lanes_tilings() -> None:
    """LANES_CASES reach, on every format of the lanes kernel: R > 1 tiles a step over several
    steps with and without a step that overruns K (EVEN), and a single ragged step."""
    launcher = _kernel()
    for fmt in LANES:
        seen = set()
        block = _block(fmt)
        for _n, blocks, block_n, tile, warps in LANES_CASES[block]:
            cfg = launcher.MatvecConfig(block_n=block_n, tile_values=tile, num_warps=warps)
            t = launcher._lanes_tiling(block * blocks, GGMLQuantizationType[fmt], cfg)
            assert t["S"] * QW[fmt] <= 32 * warps, f"{fmt}: more lanes than threads {t}"
            steps = -(-blocks // (t["S"] * t["R"]))
            seen.add((t["R"] > 1, t["EVEN"], steps > 1))
        for flags in ((True, True, True), (True, False, True), (False, False, False)):
            assert flags in seen, f"{fmt}: no case with (R > 1, EVEN, steps > 1) = {flags}"


@pytest.mark.parametrize("fmt", LANES)
def test_matvec_lanes_misaligned_takes_byte_kernel(fmt: str, monkeypatch) -> None:
    """Blocks whose start is not aligned to the lanes kernel's word (int16, int32, int64) run
    on the byte kernel."""
    launcher = _kernel()
    launched = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    k = 2 * _block(fmt)
    w = _weight(fmt, 5, k, gen)
    size = launcher._WIDE[w.qtype].view.itemsize
    flat = torch.zeros(w.raw.numel() + size, dtype=torch.uint8, device=DEVICE)
    raw = flat[size // 2 : size // 2 + w.raw.numel()].view(w.raw.shape)
    raw.copy_(w.raw)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    y = launcher.matvec(x, Weight(w.name, w.qtype, w.shape, raw))
    assert launched[-1][0] == "_matvec_kernel", f"{fmt} misaligned: ran {launched[-1][0]}"
    rtol, atol, _reason = MATVEC[(fmt, x.dtype)]
    bound = atol + rtol * (x.abs() @ w.dense().abs().T)
    _check(y, linear(x, w), bound, f"{fmt} misaligned")


# Code for run_compile_check: inside compile_only(), capture_ptx() keeps the PTX of each kernel
# compiled, and loads() gives the ld.global instructions of the last one, comma-separated.
CAPTURE_PTX = textwrap.dedent(
    r"""
    import re
    from triton.runtime.jit import JITFunction

    _ptx = []

    def capture_ptx():
        compile_instead = JITFunction.run  # compile_only() puts the original back on exit

        def run(self, *args, **kwargs):
            kernel = compile_instead(self, *args, **kwargs)
            _ptx.append(kernel.asm["ptx"])
            return kernel

        JITFunction.run = run

    def loads():
        return ",".join(sorted(set(re.findall(r"ld\.global[\w.:]*", _ptx[-1]))))
    """
)

# The weight loads of the lanes kernel (x adds b16 or b32 loads): words of 2 bytes for Q8_0,
# Q4_0, Q5_0 and Q6_K (34, 18, 22 and 210 B blocks), 4 for Q4_1 (20 B), 8 for Q5_1 (24 B) and
# Q4_K (144 B); never bytes.
LANES_LOADS = {
    "Q8_0": "b16",
    "Q6_K": "b16",
    "Q4_0": "b16",
    "Q4_1": "b32",
    "Q5_0": "b16",
    "Q5_1": "b64",
    "Q4_K": "b64",
}


def check_lanes_loads(fmt: str, loads: str) -> None:
    widths = {ld.rsplit(".", 1)[-1] for ld in loads.split(",")}
    assert LANES_LOADS[fmt] in widths and "b8" not in widths, f"{fmt} loads {loads}"


# Every plain mat-vec kernel variant for an H100 (sm_90): each format at M = 1 (the integer-view
# kernels for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) and on the byte kernel (USE_WIDE off),
# M = 3 on two formats, a K that is no multiple of 16 super-block words (11008: Q4_K's row stride
# 1548 words), and the lanes kernel at llama3-8b's Q4_0 shapes (4096 x 4096, 14336 x 4096,
# 4096 x 14336) with x in each dtype, and on each legacy format with a step that overruns K
# (K = 11008: 344 blocks, 64 a step).
_COMPILE = CAPTURE_PTX + textwrap.dedent(
    """
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from kiln.kernels import matvec
    from kiln.kernels.formats import SUPPORT
    from kiln.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, n, k):
        bv, ts = GGML_QUANT_SIZES[q]
        return Weight("w", q, (n, k), torch.empty(n, k // bv * ts, dtype=torch.uint8))

    f16 = torch.float16
    runs = [(q, True, 1, 4096, 4096, f16) for q in sorted(SUPPORT["matvec"], key=lambda q: q.value)]
    runs += [(q, False, 1, 4096, 4096, f16) for q in matvec._WIDE]
    runs += [(T.Q4_K, True, 3, 4096, 4096, f16), (T.Q8_0, True, 3, 4096, 4096, f16)]
    runs += [(T.Q4_K, True, 1, 4096, 11008, f16)]
    runs += [(T.Q4_0, True, 1, n, k, f16) for n, k in ((14336, 4096), (4096, 14336))]
    runs += [(T.Q4_0, True, 1, 4096, 4096, act) for act in (torch.float32, torch.bfloat16)]
    runs += [(q, True, 1, 4096, 11008, f16) for q in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)]
    with compile_only() as done:
        capture_ptx()
        for q, wide, m, n, k, act in runs:
            matvec.USE_WIDE = wide
            matvec.matvec(torch.empty(m, k, dtype=act), weight(q, n, k))
            print(q.name, wide, m, n, k, str(act)[6:], done[-1].kernel, loads())
    """
)


def test_matvec_compiles_for_sm90() -> None:
    from kiln.kernels.formats import SUPPORT

    out = run_compile_check(_COMPILE)
    lines = [line.split() for line in out.splitlines()]
    assert len(lines) == len(SUPPORT["matvec"]) + len(WIDE) + 3 + 8, out
    for fmt, use_wide, m, n, k, act, kernel, loads in lines:
        want = WIDE.get(fmt, "_matvec_kernel") if use_wide == "True" and m == "1" else None
        assert kernel == (want or "_matvec_kernel"), f"{fmt} M={m} {n}x{k} {act}: {kernel}"
        if kernel == "_matvec_lanes_m1_kernel":
            check_lanes_loads(fmt, loads)

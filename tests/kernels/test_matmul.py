"""kiln.kernels.matmul (the quantized GEMM and dequant_matmul) and kiln.kernels.linear (the dispatch
by M) against kiln.ops.reference.linear on random inputs and real quantization.

The GEMM rounds x and the weight to bf16 for the tensor cores, so it is compared with the float32
reference within tolerances.MATMUL's bound (a random walk of the bf16 roundings: it grows as
sqrt(K), see there). Outputs are allocated poisoned (NaN) so a tile no program writes fails. On
the CPU this runs through Triton's interpreter on small shapes (M = 9, 16, 33, 128; odd N; K of
1..3 blocks); on a GPU the same cases add M = 512 and 2048 on the real 8B sizes.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.kernels import config_name
from kiln.ops.reference import linear as reference
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import CAPTURE_PTX, _check, record_launches
from tests.kernels.test_router import _PoisonedTorch
from tests.kernels.tolerances import MATMUL, QUANTS_REL

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if CUDA else "cpu")

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_T = GGMLQuantizationType


def _block(fmt: str) -> int:
    return quant.get_format(fmt).block_size


def _shapes(fmt: str) -> list[tuple[int, int, int]]:
    """(M, N, K) with the default configs: M = 9 (just above the mat-vec), 16, 33 and 128, odd N,
    K of 1, 2 and 3 blocks (floats: 100, not a multiple of the tile); on a GPU also M = 512 and
    2048 on qwen3-8b's sizes (merged QKV, the down projection's K, odd N)."""
    b = _block(fmt)
    k1, k2, k3 = (b, 2 * b, 3 * b) if b > 1 else (32, 100, 96)
    shapes = [(9, 33, k3), (16, 97, k1), (33, 33, k2), (128, 97, k3)]
    if CUDA:
        shapes += [(512, 6144, 4096), (2048, 4096, 4096), (512, 4097, 12288), (2048, 33, 4096)]
        shapes += [(9, 4096, 4096)]
    return shapes


def _weight(fmt: str, n: int, k: int, gen: torch.Generator) -> Weight:
    qtype = _T[fmt]
    raw = quant.quantize(torch.randn(n, k, generator=gen, device=gen.device), qtype).to(DEVICE)
    return Weight(f"w_{fmt}", qtype, (n, k), raw)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def check_matmul(y: torch.Tensor, x: torch.Tensor, w: Weight, what: str) -> None:
    """y against the float32 reference within tolerances.MATMUL's bound (and a bf16 output's own
    rounding); a failure names the worst index, the mismatch count and any NaN/inf."""
    l2, l1, atol, _reason = MATMUL[w.qtype.name]
    xf, dense = x.float(), w.dense()
    ref = reference(xf, w)
    bound = atol + l1 * (xf.abs() @ dense.abs().T) + l2 * ((xf * xf) @ (dense * dense).T).sqrt()
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (ref.abs() + bound)
    _check(y.float(), ref, bound, what)


def _launcher():
    from kiln.kernels import matmul

    if not CUDA and not matmul.interpreting():
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return matmul


@pytest.fixture
def mm(monkeypatch):
    """kiln.kernels.matmul with its outputs (and dequant_matmul's buffers) allocated poisoned."""
    mod = _launcher()
    monkeypatch.setattr(mod, "torch", _PoisonedTorch())
    monkeypatch.setattr(mod, "_BUFFERS", {})
    return mod


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_matches_reference(fmt: str, mm, monkeypatch) -> None:
    launched = record_launches(monkeypatch)
    gen = _gen(1234)
    for m, n, k in _shapes(fmt):
        w = _weight(fmt, n, k, gen)
        x = torch.randn(m, k, generator=gen, device=DEVICE)
        y = mm.matmul(x, w)
        assert launched[-1][0] == "_matmul_kernel", launched[-1][0]
        check_matmul(y, x, w, f"{fmt} M={m} N={n} K={k} {mm.default_config(w.qtype, n, k, m)}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_matmul_matches_reference(fmt: str, mm, monkeypatch) -> None:
    """exact=True (batched decode rows): fp32 tiles, tf32x3 products on a GPU (fp32 in the
    interpreter), within a few fp32 ulps of the reference: the mat-vec's bound, not the bf16
    one. M = 2, 3 and 8; odd N; on a GPU the 8B model's sizes."""
    launched = record_launches(monkeypatch)
    gen = _gen(4321)
    b = _block(fmt)
    shapes = [(2, 33, 2 * b if b > 1 else 100), (3, 97, 3 * b if b > 1 else 96)]
    shapes += [(8, 65, b if b > 1 else 32)]
    if CUDA:
        shapes += [(8, 6144, 4096), (2, 4096, 12288), (5, 4097, 4096)]
    for m, n, k in shapes:
        w = _weight(fmt, n, k, gen)
        x = torch.randn(m, k, generator=gen, device=DEVICE)
        y = mm.matmul(x, w, exact=True)
        assert launched[-1][0] == "_matmul_kernel", launched[-1][0]
        xf, dense = x.float(), w.dense()
        bound = 1e-6 + 4e-6 * (xf.abs() @ dense.abs().T)
        _check(y, reference(xf, w), bound, f"exact {fmt} M={m} N={n} K={k}")


# (format, M, N, K, config): the kernel's other paths. x @ W^T order (swap_ab off: the weight
# through shared memory), K not a multiple of BLOCK_K (EVEN_K off: a step past the last block),
# several row tiles in a ragged launch group (GROUP_M 2 over 3 row tiles), BLOCK_K of one group
# and of several super-blocks, a bf16 output.
_C = "block_m block_n block_k group_m num_warps num_stages swap_ab".split()
TILINGS = [
    ("Q4_0", 33, 40, 96, dict(zip(_C, (16, 32, 64, 2, 4, 1, True)))),
    ("Q4_K", 40, 33, 768, dict(zip(_C, (16, 16, 512, 2, 4, 1, False)))),
    ("Q6_K", 9, 65, 512, dict(zip(_C, (16, 64, 32, 1, 4, 1, True)))),
    ("Q5_1", 20, 19, 64, dict(zip(_C, (32, 16, 32, 2, 4, 1, False)))),
    ("F16", 17, 21, 50, dict(zip(_C, (16, 16, 32, 2, 4, 1, False)))),
    ("Q8_0", 64, 33, 128, dict(zip(_C, (32, 16, 128, 1, 4, 1, True)))),
]


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
@pytest.mark.parametrize("case", TILINGS, ids=lambda c: f"{c[0]}_M{c[1]}_N{c[2]}_K{c[3]}")
def test_matmul_tilings(case, out_dtype, mm) -> None:
    fmt, m, n, k, fields = case
    cfg = mm.MatmulConfig(**fields)
    gen = _gen(m * n)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen, device=DEVICE).to(torch.float16)
    y = mm.matmul(x, w, cfg, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    check_matmul(y, x, w, f"{fmt} M={m} N={n} K={k} {cfg} -> {out_dtype}")


def test_tilings_reach_every_path() -> None:
    """TILINGS cover both dot orders, K with and without a ragged last step, more than one row
    tile with GROUP_M > 1, for legacy, K-quant and float formats."""
    mm = _launcher()
    seen = set()
    for fmt, m, _n, k, fields in TILINGS:
        cfg = mm.MatmulConfig(**fields)
        even = k % cfg.block_k == 0
        seen.add((_block(fmt), cfg.swap_ab, even))
        seen.add(("groups", -(-m // cfg.block_m) > cfg.group_m > 1))
    for want in [(32, True, False), (32, False, True), (256, False, False), (256, True, True)]:
        assert want in seen, want
    assert (1, False, False) in seen and ("groups", True) in seen


# Every format and path with the weight loads issued a step ahead (MatmulConfig.ahead): TILINGS'
# cases (both dot orders, a ragged last step, several super-blocks a step) and the default
# configs' shapes; one step (K = one block) fetches its only step twice.
AHEAD = (
    [c[:4] + (dict(c[4]),) for c in TILINGS]
    + [(fmt, 9, 33, 3 * _block(fmt) if _block(fmt) > 1 else 100, None) for fmt in FORMATS]
    + [("Q4_K", 16, 64, 256, dict(zip(_C, (16, 64, 256, 1, 4, 1, True))))]
)


@pytest.mark.parametrize(
    "case", AHEAD, ids=lambda c: f"{c[0]}_M{c[1]}_N{c[2]}_K{c[3]}_{bool(c[4])}"
)
def test_loads_ahead_give_the_same_bits(case, mm) -> None:
    """ahead only moves the weight loads one step earlier: the same values multiplied in the
    same order, so the output is bit for bit that of the loads in their step."""
    fmt, m, n, k, fields = case
    cfg = mm.MatmulConfig(**fields) if fields else mm.default_config(_T[fmt], n, k, m)
    gen = _gen(m + n + k)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen, device=DEVICE)
    base = mm.matmul(x, w, dataclasses.replace(cfg, ahead=False))
    ahead = mm.matmul(x, w, dataclasses.replace(cfg, ahead=True))
    assert torch.equal(base, ahead), f"{fmt} M={m} N={n} K={k} {cfg}"
    check_matmul(ahead, x, w, f"ahead {fmt} M={m} N={n} K={k} {cfg}")


# The quant domain (MatmulConfig.quants) for every block format: one row tile (M = 9), three
# (M = 33), a ragged last step (legacy K = 3 blocks in steps of 64; K-quants 768 in 512), split-K
# into 2 and 3 ranges; on a GPU also M = 16, 32, 64 on qwen3-8b's gate/up and down shapes.
BLOCK_FORMATS = [f for f in FORMATS if _block(f) > 1]


def _quants_cases() -> list[tuple]:
    """(format, M, N, K, MatmulConfig fields in the quant domain)."""

    def tile(bm, bn, bk, group_m, warps, stages, splits=None) -> dict:
        return dict(zip(_C, (bm, bn, bk, group_m, warps, stages, True)), splits=splits, quants=True)

    cases = []
    for fmt in BLOCK_FORMATS:
        kq = _block(fmt) == 256
        step = 256 if kq else 64
        cases += [
            (fmt, 9, 33, 768 if kq else 96, tile(16, 64, step, 1, 4, 2)),
            (fmt, 33, 97, 512, tile(16, 64, step, 2, 4, 2, 2)),
            (fmt, 5, 64, 768 if kq else 96, tile(16, 32, 512 if kq else 64, 1, 4, 1, 3)),
        ]
        if CUDA:
            for m in (16, 32, 64):
                cases += [(fmt, m, 24576, 4096, tile(m, 64, 256, 1, 4, 3, 2))]
                cases += [(fmt, m, 4096, 12288, tile(m, 64, 256, 1, 4, 3, 4))]
    return cases


def _quants_id(case) -> str:
    return f"{case[0]}_M{case[1]}_N{case[2]}_K{case[3]}_{case[4]['block_k']}"


def _quants_inputs(mm, case, salt: int):
    """A quant-domain case's (config, weight, x, its name); salt varies the random data."""
    fmt, m, n, k, fields = case
    cfg = mm.MatmulConfig(**fields)
    gen = _gen(m + salt * n + k)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen, device=DEVICE)
    return cfg, w, x, f"{fmt} M={m} N={n} K={k} {cfg}"


@pytest.mark.parametrize("case", _quants_cases(), ids=_quants_id)
def test_quant_domain_matches_reference(case, mm) -> None:
    """The quant domain against the reference of the bf16-rounded x, in float64, within
    tolerances.QUANTS_REL (its weight values are exact: far tighter than MATMUL's bound); the
    standard bound too; two launches give the same bits."""
    cfg, w, x, what = _quants_inputs(mm, case, 3)
    y = mm.matmul(x, w, cfg)
    assert torch.equal(y, mm.matmul(x, w, cfg))
    what = f"quants {what}"
    check_matmul(y, x, w, what)
    xb, dense = x.to(torch.bfloat16).double(), w.dense().double()
    bound = 1e-6 + QUANTS_REL * (xb.abs() @ dense.abs().T)
    _check(y, (xb @ dense.T).float(), bound.float(), what)


@pytest.mark.parametrize("case", _quants_cases(), ids=_quants_id)
def test_exact_quant_domain_matches_reference(case, mm) -> None:
    """exact=True in the quant domain (x as three bf16 parts): within the exact GEMM's bound of
    the float32 reference (test_split_k's), x not rounded."""
    cfg, w, x, what = _quants_inputs(mm, case, 5)
    y = mm.matmul(x, w, cfg, exact=True)
    xf, dense = x.double(), w.dense().double()
    bound = 1e-6 + 4e-6 * (xf.abs() @ dense.abs().T)
    _check(y, (xf @ dense.T).float(), bound.float(), f"exact quants {what}")


@pytest.mark.parametrize("exact", (False, True), ids=("bf16", "exact"))
@pytest.mark.parametrize(
    "case",
    [c for c in _quants_cases() if c[0] in ("Q4_K", "Q5_K") and c[4]["block_k"] == 256],
    ids=_quants_id,
)
def test_quant_domain_ahead_gives_the_same_bits(case, exact: bool, mm) -> None:
    """ahead only fetches each super-block's bytes a step earlier: the same bits."""
    cfg, w, x, what = _quants_inputs(mm, case, 7)
    base = mm.matmul(x, w, cfg, exact=exact)
    ahead = mm.matmul(x, w, dataclasses.replace(cfg, ahead=True), exact=exact)
    assert torch.equal(base, ahead), what


def test_quant_domain_refuses_what_it_cannot_run(mm) -> None:
    gen = _gen(5)
    x = torch.randn(16, 512, generator=gen, device=DEVICE)
    for fmt, fields in (
        ("F16", {}),
        ("Q4_K", {"block_k": 128}),
        ("Q8_0", {"swap_ab": False}),
        ("Q6_K", {"ahead": True}),
        ("Q4_K", {"ahead": True, "block_k": 512}),
    ):
        cfg = dataclasses.replace(mm.MatmulConfig(16, 64, 256, 1, 4, 2, quants=True), **fields)
        with pytest.raises(AssertionError, match="quants"):
            mm.matmul(x, _weight(fmt, 64, 512, gen), cfg)


# (format, M, N, K, MatmulConfig fields with splits): split-K's K ranges. Whole ranges (Q4_K:
# 12 steps in 3), a last range past K (Q8_0: 3 steps in 2 ranges of 2; F16: K = 100 in ranges
# of 64), both dot orders.
SPLITS = [
    ("Q4_K", 9, 33, 768, (16, 32, 64, 1, 4, 1, True, 3)),
    ("Q8_0", 5, 40, 192, (16, 32, 64, 1, 4, 1, True, 2)),
    ("F16", 3, 21, 100, (16, 16, 32, 1, 4, 1, False, 2)),
    ("Q6_K", 2, 17, 512, (16, 64, 64, 1, 4, 1, True, 4)),
]


@pytest.mark.parametrize("exact", (False, True), ids=("bf16", "exact"))
@pytest.mark.parametrize("case", SPLITS, ids=lambda c: f"{c[0]}_M{c[1]}_N{c[2]}_K{c[3]}")
def test_split_k(case, exact: bool, mm, monkeypatch) -> None:
    """Split-K: the launch has a program column per range, every range's partial sums reach
    the output (outputs and partial sums are allocated poisoned) within the bound of one
    split, and two launches give the same bits (the ranges are added in split order)."""
    fmt, m, n, k, fields = case
    cfg = mm.MatmulConfig(*fields)
    grids = []
    cls = type(mm._k._matmul_kernel)
    run = cls.run
    monkeypatch.setattr(
        cls, "run", lambda self, *a, **kw: grids.append(kw["grid"]) or run(self, *a, **kw)
    )
    gen = _gen(7 * n + k)
    w = _weight(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen, device=DEVICE)
    y = mm.matmul(x, w, cfg, exact=exact)
    assert grids[-1][1] == cfg.splits, grids
    assert torch.equal(y, mm.matmul(x, w, cfg, exact=exact))
    what = f"split-K {'exact ' if exact else ''}{fmt} M={m} N={n} K={k} {cfg}"
    if exact:
        xf, dense = x.float(), w.dense()
        _check(y, reference(xf, w), 1e-6 + 4e-6 * (xf.abs() @ dense.abs().T), what)
    else:
        check_matmul(y, x, w, what)


def test_auto_splits() -> None:
    """auto_splits: decode-sized launches (M <= SPLIT_M_MAX) split K until the tiles reach
    TARGET_PROGRAMS, at least 4 BLOCK_K steps a split; larger M and a config's own count
    are left alone."""
    mm = _launcher()
    cfg = mm.MatmulConfig(16, 64, 128, 1, 4, 3)
    assert mm.auto_splits(8, 4096, 4096, cfg) == 8  # 64 tiles, 32 steps: 4 steps a split
    assert mm.auto_splits(8, 24576, 4096, cfg) == 2  # 384 tiles
    assert mm.auto_splits(16, 4096, 12288, cfg) == 8  # 512 / 64 tiles
    assert mm.auto_splits(64, 151936, 4096, cfg) == 1  # 2374 tiles
    assert mm.auto_splits(16, 64, 256, cfg) == 1  # 2 steps: no split
    assert mm.auto_splits(65, 4096, 4096, cfg) == 1  # above SPLIT_M_MAX
    assert mm.auto_splits(8, 4096, 4096, mm.MatmulConfig(16, 64, 128, 1, 4, 3, splits=3)) == 3


def test_dequant_matmul(mm, monkeypatch) -> None:
    """dequant_matmul against the reference for every format; dequantize is bf16(reference)
    bit for bit; two weights of one shape share one kept buffer, each product with its own."""
    launched = record_launches(monkeypatch)
    gen = _gen(99)
    shapes = set()
    for fmt in FORMATS:
        b = _block(fmt)
        m, n, k = (33, 33, 3 * b) if b > 1 else (33, 33, 100)
        w1, w2 = _weight(fmt, n, k, gen), _weight(fmt, n, k, gen)
        deq = mm.dequantize(w1)
        same = deq.view(torch.int16) == w1.dense().to(torch.bfloat16).view(torch.int16)
        assert bool(same.all()), f"{fmt}: {int((~same).sum())} dequantized values differ"
        x = torch.randn(m, k, generator=gen, device=DEVICE)
        y1 = mm.dequant_matmul(x, w1)
        buf = mm._BUFFERS[(x.device, n, k)]
        y2 = mm.dequant_matmul(x, w2)
        assert mm._BUFFERS[(x.device, n, k)] is buf, "a second buffer for the same shape"
        assert launched[-1][0] == "_dequant_kernel", launched[-1][0]
        check_matmul(y1, x, w1, f"{fmt} dequant_matmul w1")
        check_matmul(y2, x, w2, f"{fmt} dequant_matmul w2")
        yb = mm.dequant_matmul(x, w1, out_dtype=torch.bfloat16)
        check_matmul(yb, x, w1, f"{fmt} dequant_matmul -> bf16")
        shapes.add((n, k))
    assert len(mm._BUFFERS) == len(shapes), "not one buffer per shape"


def _q2_k_blocks(n: int, gen: torch.Generator) -> torch.Tensor:
    """n rows of one random Q2_K super-block (Kiln reads Q2_K but does not write it): random
    scales and quants, d = dmin = 2^-6 (84 B: scales 16, qs 64, d, dmin)."""
    raw = torch.randint(0, 256, (n, 84), generator=gen, device=DEVICE, dtype=torch.uint8)
    raw[:, 80:84] = torch.tensor([2.0**-6] * 2, dtype=torch.float16).view(torch.uint8).to(DEVICE)
    return raw


def test_linear_dispatch(monkeypatch) -> None:
    """kiln.kernels.linear, and the triton op set's linear through it: M = 1 runs the mat-vec,
    M = 2..8 batch_method's by format (the one-row mat-vec once a row, the byte mat-vec, the
    exact GEMM: FLOAT_BATCH), M = 9 the GEMM, "dequant" in the table dequant_matmul; formats no
    kernel reads give None (the op set then runs the reference); the bias is added; M = 0 gives
    [0, N]."""
    from kiln.kernels import linear as lin
    from kiln.kernels import matmul as mm
    from kiln.kernels import matvec
    from kiln.ops import triton_backend

    launched = record_launches(monkeypatch)
    gen = _gen(5)
    w = _weight("Q4_K", 40, 256, gen)
    bias = Weight("b", _T.F32, (40,), torch.randn(40).view(torch.uint8).to(DEVICE))
    op = triton_backend.ops()["linear"]
    monkeypatch.setitem(lin.FLOAT_BATCH, _T.Q4_K, (1, 9))  # the byte mat-vec at 2..8 rows
    for m, kernel in ((1, "_matvec_lanes_m1_kernel"), (8, "_matvec_kernel"), (9, "_matmul_kernel")):
        x = torch.randn(m, 256, generator=gen, device=DEVICE)
        y = lin.linear(x, w, bias)
        assert launched[-1][0] == kernel, f"M={m}: {launched[-1][0]}"
        assert lin.route(m, w) == {"_matmul_kernel": "triton"}.get(kernel, "matvec")
        check_matmul(y - bias.dense(), x, w, f"linear M={m}")
        count = len(launched)
        assert torch.equal(op(x, w, bias), y), f"M={m}: the op set's linear differs"
        assert launched[count:] == launched[count - 1 : count], f"M={m}: op set ran {launched[-1]}"
    assert lin.linear(torch.zeros(0, 256, device=DEVICE), w).shape == (0, 40)
    monkeypatch.undo()
    q4k, q6k, q8 = _T.Q4_K, _T.Q6_K, _T.Q8_0
    assert [lin.batch_method(m, q4k) for m in range(2, 9)] == ["rows"] * 5 + ["exact"] * 2
    assert [lin.batch_method(m, q6k) for m in range(2, 9)] == ["rows"] * 2 + ["exact"] * 5
    assert [lin.batch_method(m, q8) for m in range(2, 9)] == ["matvec"] * 3 + ["exact"] * 4
    launched = record_launches(monkeypatch)
    x = torch.randn(3, 256, generator=gen, device=DEVICE)
    y = lin.linear(x, w)
    assert lin.route(3, w) == "rows" and [n for n, _ in launched] == ["_matvec_lanes_m1_kernel"] * 3
    for i in range(3):  # each row: the bits of a batch of one
        assert torch.equal(y[i : i + 1], matvec.matvec(x[i : i + 1].contiguous(), w)), i
    x = torch.randn(7, 256, generator=gen, device=DEVICE)
    assert lin.route(7, w) == "exact" and lin.route(1, w) == "matvec"
    check_matmul(lin.linear(x, w), x, w, "linear M=7 exact")
    assert launched[-1][0] == "_matmul_kernel"

    monkeypatch.setattr(mm, "method", lambda *args: "dequant")
    x = torch.randn(9, 256, generator=gen, device=DEVICE)
    y = lin.linear(x, w)
    assert [name for name, _ in launched[-1:]] == ["_dequant_kernel"], launched[-1][0]
    check_matmul(y, x, w, "linear M=9 dequant")

    count = len(launched)
    q2 = Weight("w", _T.Q2_K, (40, 256), _q2_k_blocks(40, gen))
    x = torch.randn(9, 256, generator=gen, device=DEVICE)
    assert lin.linear(x, q2) is None and lin.route(9, q2) is None
    y = op(x, q2)
    assert torch.equal(y, reference(x, q2)) and y.abs().sum() > 0
    assert len(launched) == count, "a kernel ran for a format it does not read"


def test_matmul_rejects_bad_input() -> None:
    mm = _launcher()
    w = _weight("Q8_0", 4, 64, _gen(0))
    with pytest.raises(AssertionError, match="K=32"):
        mm.matmul(torch.zeros(9, 32, device=DEVICE), w)
    with pytest.raises(AssertionError, match="float32 or bfloat16"):
        mm.matmul(torch.zeros(9, 64, device=DEVICE), w, out_dtype=torch.float16)
    with pytest.raises(AssertionError, match="does not support Q2_K"):
        q2 = Weight("w", _T.Q2_K, (4, 256), _q2_k_blocks(4, _gen(0)))
        mm.matmul(torch.zeros(9, 256, device=DEVICE), q2)
    with pytest.raises(AssertionError, match="power of two"):
        mm.matmul(torch.zeros(9, 64, device=DEVICE), w, mm.MatmulConfig(16, 16, 48, 1, 4, 1))


def test_tuned_table(tmp_path, monkeypatch) -> None:
    """The table of scripts/tune_matmul.py: read for its GPU only, by M bucket (9..16 -> 16,
    above 8192 -> 8192), the method and the Triton config of each entry; shapes and buckets
    without an entry get the untuned default and the Triton kernel."""
    from kiln.kernels import matmul as mm

    assert [mm.m_bucket(m) for m in (9, 16, 17, 512, 513, 8192, 100000)] == [
        16, 16, 32, 512, 1024, 8192, 8192,
    ]  # fmt: skip
    monkeypatch.setattr(mm, "CONFIG_DIR", tmp_path)
    mm.tuned_configs.cache_clear()
    name = "NVIDIA Test GPU"
    cfg = dict(zip(_C[:-1], (64, 64, 128, 4, 4, 2)))
    (tmp_path / config_name("matmul", name)).write_text(
        json.dumps(
            {
                "Q4_K": {
                    "64x256": {
                        "512": {"method": "triton", **cfg, "swap_ab": False, "us": 1.0},
                        "2048": {"method": "dequant", **cfg, "us": 2.0},
                    }
                }
            }
        )
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    q4k, cuda = _T.Q4_K, torch.device("cuda")
    try:
        tuned = mm.MatmulConfig(64, 64, 128, 4, 4, 2, swap_ab=False)
        assert mm.default_config(q4k, 64, 256, 300, cuda) == tuned
        assert mm.method(q4k, 64, 256, 300, cuda) == "triton"
        assert mm.method(q4k, 64, 256, 1500, cuda) == "dequant"
        assert mm.default_config(q4k, 64, 256, 1500, cuda) == mm.MatmulConfig(64, 64, 128, 4, 4, 2)
        untuned = mm.default_config(q4k, 64, 256, 300, cuda, tuned=False)
        assert untuned != tuned
        for args in ((q4k, 64, 256, 100, cuda), (q4k, 64, 512, 300, cuda), (q4k, 64, 256, 300)):
            assert mm.method(*args) == "triton"
        assert mm.default_config(q4k, 64, 256, 300, torch.device("cpu")) == untuned
        assert mm.default_config(_T.Q6_K, 64, 256, 300, cuda) == untuned
    finally:
        mm.tuned_configs.cache_clear()


def test_tune_script_writes_what_the_launcher_reads(tmp_path, monkeypatch, capsys) -> None:
    """scripts/tune_matmul.py (it measures on a GPU only) parses its flags, and the table it
    writes (entry, merge: a second run keeps the first run's buckets) is the one default_config
    and method read."""
    import importlib.util

    from kiln.kernels import matmul as mm

    spec = importlib.util.spec_from_file_location("_tune_matmul", ROOT / "scripts/tune_matmul.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--help"])
    assert e.value.code == 0 and "--buckets" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--buckets", "512,100"])
    assert e.value.code == 2 and "100 not in" in capsys.readouterr().err
    if not CUDA:
        assert script.main([]) == 1 and "needs a CUDA GPU" in capsys.readouterr().err
    assert all(script.candidates(b) for b in mm.M_BUCKETS)
    quants = [c for c in script.candidates(64, _T.Q4_K) if c.quants]
    assert quants and all(c.block_k == 256 and c.swap_ab for c in quants)
    assert any(c.ahead for c in quants)
    assert not any(c.ahead for c in script.candidates(64, _T.Q6_K) if c.quants)
    assert not any(c.quants for c in script.candidates(64, _T.F16) + script.candidates(512))

    name = "NVIDIA Test GPU"
    path = tmp_path / config_name("matmul", name)
    first, second = script.candidates(512)[:2]
    script.merge(path, {"Q4_K": {"64x256": {"512": script.entry(first, 10.0, 20.0, 12.0)}}})
    script.merge(path, {"Q4_K": {"64x256": {"2048": script.entry(second, 30.0, 20.0, 31.0)}}})
    monkeypatch.setattr(mm, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    mm.tuned_configs.cache_clear()
    cuda = torch.device("cuda")
    try:
        assert mm.default_config(_T.Q4_K, 64, 256, 300, cuda) == first
        assert mm.method(_T.Q4_K, 64, 256, 300, cuda) == "triton"
        assert mm.default_config(_T.Q4_K, 64, 256, 2000, cuda) == second
        assert mm.method(_T.Q4_K, 64, 256, 2000, cuda) == "dequant"  # 20 us < 0.97 * 30 us
    finally:
        mm.tuned_configs.cache_clear()


# Every format through the GEMM at its default configs for M = 16, 512 and 2048 (16, 128 and 256
# rows a program), the x @ W^T order at M = 512, the quant domain of every block format at M = 16
# and 64 (and exact at M = 8 for three), and the dequantization kernel: for an H100
# (sm_90), with the tensor-core instructions of the PTX and the shared memory.
_COMPILE = CAPTURE_PTX + textwrap.dedent(
    """
    import re
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from kiln.kernels import matmul
    from kiln.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, n, k):
        bv, ts = GGML_QUANT_SIZES[q]
        return Weight("w", q, (n, k), torch.empty(n, k // bv * ts, dtype=torch.uint8))

    def mma():
        ops = re.findall(r"\\b(wgmma\\.mma_async|mma\\.sync)\\.", _ptx[-1])
        return ",".join(sorted(set(ops))) or "none"

    runs = []
    for q in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        runs += [(q, 16, None), (q, 512, None), (q, 2048, None), (q, 0, None)]
    for q in (T.Q4_0, T.Q4_K, T.Q6_K, T.F16):
        runs += [(q, 512, matmul.MatmulConfig(128, 128, 64, 8, 8, 3, swap_ab=False))]
    for q in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        for m in (16, 64):
            runs += [(q, m, matmul.MatmulConfig(m, 64, 256, 1, 4, 3, splits=2, quants=True))]
    for q in (T.Q8_0, T.Q4_K, T.Q6_K):  # exact: x in three bf16 parts
        runs += [(q, -8, matmul.MatmulConfig(16, 64, 256, 1, 4, 3, splits=2, quants=True))]
    with compile_only() as done:
        capture_ptx()
        for q, m, cfg in runs:
            w = weight(q, 4096, 4096)
            if m == 0:
                matmul.dequantize(w)
            else:
                x = torch.empty(abs(m), 4096, dtype=torch.bfloat16)
                matmul.matmul(x, w, cfg, exact=m < 0)
            c = done[-1]
            kind = "default" if cfg is None else "quants" if cfg.quants else "xW"
            kind += "-exact" if m < 0 else ""
            print(q.name, m, kind, c.kernel, c.shared_bytes, mma())
    """
)
SMEM_LIMIT = 227 * 1024  # an H100's shared memory per block


def test_matmul_compiles_for_sm90() -> None:
    lines = [line.split() for line in run_compile_check(_COMPILE).splitlines()]
    assert len(lines) == 4 * len(FORMATS) + 4 + 2 * len(BLOCK_FORMATS) + 3, lines
    for fmt, m, kind, kernel, shared, mma in lines:
        what = f"{fmt} M={m} {kind}"
        assert int(shared) <= SMEM_LIMIT, f"{what}: {shared} B of shared memory"
        if m == "0":
            assert kernel == "_dequant_kernel" and mma == "none", (what, kernel, mma)
        else:
            assert kernel == "_matmul_kernel", (what, kernel)
            assert mma == "wgmma.mma_async", f"{what}: tensor-core instructions {mma}"


@pytest.mark.skipif(not CUDA, reason="a 2.5 GB weight: on a GPU only")
def test_matmul_large_row_offsets(mm) -> None:
    """An f32 weight of 151936 x 4096 (qwen3's output projection): rows start past 2**31 bytes."""
    gen = _gen(3)
    w = _weight("F32", 151936, 4096, gen)
    x = torch.randn(33, 4096, generator=gen, device=DEVICE)
    check_matmul(mm.matmul(x, w), x, w, "F32 M=33 N=151936 K=4096")

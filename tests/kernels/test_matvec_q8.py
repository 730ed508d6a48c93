"""q8_1 activations (kiln/quant/q8_1.py): the reference quantizer's contract, the quantize kernel
against it (bit for bit) and the int8 mat-vec (kiln/kernels/matvec_q8.py) against
reference.linear of the dequantized activations, over a shape and tiling table.

On the CPU the kernels run in Triton's interpreter (dp4a emulated: DP4A off) on small shapes; on a
GPU the same cases run compiled, with the real shapes of the standard models added.
"""

from __future__ import annotations

import functools

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.kernels import matvec_q8
from kiln.kernels.matvec import MatvecConfig
from kiln.kernels.quantize import quantize_q8_1
from kiln.ops.reference import expert_linear as reference_expert_linear
from kiln.ops.reference import linear
from kiln.quant import q8_1
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.test_norm import ROOT
from tests.kernels.tolerances import MATVEC_Q8

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def test_reference_quantizer_contract() -> None:
    """d = amax / 127 (the largest value maps to +-127), every value within d / 2 of d * q, an
    all-zero block all zeros, ties away from zero, s = d * sum(q)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 256, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e4])[:, None]
    x[1, :32] = 0.0
    x[2, 32:64] = torch.linspace(-1, 1, 32)
    x[2, 33] = -5.0  # amax -5: d = 5 / 127 and -5 -> -127
    a = q8_1.quantize(x)
    d = a.ds[..., 0]
    amax = x.reshape(4, 8, 32).abs().amax(-1)
    assert torch.equal(d, amax / torch.tensor(127.0)), "d is amax / 127"
    assert int(a.qs[2, 33]) == -127
    assert torch.equal(a.qs[1, :32], torch.zeros(32, dtype=torch.int8)) and float(d[1, 0]) == 0
    err = (q8_1.dequantize(a) - x).reshape(4, 8, 32).abs()
    assert (err <= d[..., None] * (0.5 + 1e-6)).all(), "each value within half a step"
    sums = a.qs.reshape(4, 8, 32).float().sum(-1)
    assert torch.equal(a.ds[..., 1], d * sums), "s = d * sum(q)"
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997])
    assert q8_1.round_half_away(v).tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 0.0]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_quantize_kernel_equals_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = [(1, 32), (3, 96), (2, 576), (1, 4096)] + ([(8, 4096), (5, 12288)] if CUDA else [])
    for m, k in shapes:
        x = (torch.randn(m, k, generator=gen) * 4).to(dtype)
        x[0, :32] = 0
        want = q8_1.quantize(x.float())
        got = quantize_q8_1(x.to(DEVICE))
        assert torch.equal(got.qs.cpu(), want.qs), f"quants differ at M={m} K={k}"
        assert torch.equal(got.ds.cpu(), want.ds), f"scales differ at M={m} K={k}"


def _shapes(block: int) -> list[tuple[int, int, int, MatvecConfig | None]]:
    """(M, N, K, config): M = 1, 3, 8 with the default config; tilings with a ragged last step
    (3 blocks a row, 2 a tile), one block a tile, R > 1 tiles a step; real shapes on a GPU."""
    shapes = [
        (1, 33, 3 * block, None),
        (3, 17, 2 * block, None),
        (8, 5, block, None),
        (2, 9, 3 * block, MatvecConfig(4, 2 * block, 4)),
        (1, 7, 5 * block, MatvecConfig(2, block, 1)),
        (4, 6, 8 * block, MatvecConfig(2, 8 * block, 1)),
    ]
    if CUDA:
        shapes += [(m, 4096, 4096, None) for m in (1, 2, 8)]
        shapes += [(1, 12288, 4096, None), (1, 4096, 12288, None), (5, 1024, 1024, None)]
    return shapes


def check_int8_kernel(fmt: str, shapes, reads, run, seed: int) -> None:
    """An int8 kernel (`run(x, weight, config)`, which `reads(weight)` must accept) against
    reference.linear of the dequantized q8_1 rows, for each (M, N, K, config) of `shapes`
    (a function of the format's block size), within MATVEC_Q8's bound of the terms' magnitudes."""
    qtype = GGMLQuantizationType[fmt]
    block = quant.get_format(qtype).block_size
    rtol, atol, _reason = MATVEC_Q8[fmt]
    gen = torch.Generator().manual_seed(seed)
    for m, n, k, cfg in shapes(block):
        raw = quant.quantize(torch.randn(n, k, generator=gen), qtype).to(DEVICE)
        w = Weight(f"w_{fmt}", qtype, (n, k), raw)
        assert reads(w)
        x = q8_1.quantize(torch.randn(m, k, generator=gen))
        x = q8_1.Q8_1(x.qs.to(DEVICE), x.ds.to(DEVICE))
        y = run(x, w, cfg)
        xd = q8_1.dequantize(x)
        ref = linear(xd, w)
        bound = atol + rtol * (xd.abs() @ w.dense().abs().T)
        _check(y, ref, bound, f"{fmt} M={m} N={n} K={k} {cfg}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_q8_matches_reference(fmt: str) -> None:
    reads = functools.partial(matvec_q8.reads, m=8)
    check_int8_kernel(fmt, _shapes, reads, matvec_q8.matvec_q8, seed=11)


@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_matvec_q8_matches_reference(fmt: str) -> None:
    """The MoE decode variant against reference.expert_linear of the dequantized rows: x a row a
    token (gate/up: a token's k slots share it) and a row a slot (down), T = 1 and 3, k = 1 and
    2, repeated experts; a ragged tile on the CPU, real shapes on a GPU."""
    qtype = GGMLQuantizationType[fmt]
    block = quant.get_format(qtype).block_size
    rtol, atol, _reason = MATVEC_Q8[fmt]
    gen = torch.Generator().manual_seed(17)
    n_exp = 4
    shapes = [(9, 3 * block, None), (5, block, MatvecConfig(2, block, 1))]
    if CUDA:
        shapes += [(1536, 2048, None), (2048, 768, None)]
    for n, k, cfg in shapes:
        raw = torch.stack(
            [quant.quantize(torch.randn(n, k, generator=gen), qtype) for _ in range(n_exp)]
        ).to(DEVICE)
        w = Weight(f"e_{fmt}", qtype, (n_exp, n, k), raw)
        assert matvec_q8.reads(w, 2)
        for ids, per_slot in (
            ([[2]], False),
            ([[3, 1]], False),
            ([[0, 3], [3, 3], [1, 0]], False),
            ([[0, 3], [2, 2], [1, 0]], True),
        ):
            ids = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
            rows = ids.numel() if per_slot else ids.shape[0]
            x = q8_1.quantize(torch.randn(rows, k, generator=gen))
            x = q8_1.Q8_1(x.qs.to(DEVICE), x.ds.to(DEVICE))
            y = matvec_q8.expert_matvec_q8(x, ids, w, cfg)
            xd = q8_1.dequantize(x)
            ref = reference_expert_linear(xd, ids, w)
            full = xd if per_slot else xd.repeat_interleave(ids.shape[1], 0)
            dense = w.dense()[ids.reshape(-1).long()]  # [slots, N, K]
            bound = atol + rtol * torch.einsum("sk,snk->sn", full.abs(), dense.abs())
            _check(y, ref, bound, f"{fmt} experts N={n} K={k} ids={ids.tolist()} {cfg}")


def test_matvec_q8_rejects_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    w = Weight("w", GGMLQuantizationType.Q4_0, (4, 64), quant.quantize(torch.randn(4, 64), "Q4_0"))
    x = q8_1.quantize(torch.randn(1, 32, generator=gen))
    with pytest.raises(AssertionError, match="K=32"):
        matvec_q8.matvec_q8(x, w)
    with pytest.raises(AssertionError, match="1..8"):
        matvec_q8.matvec_q8(q8_1.quantize(torch.randn(9, 64, generator=gen)), w)
    f16 = Weight("w", GGMLQuantizationType.F16, (4, 64), quant.quantize(torch.randn(4, 64), "F16"))
    assert not matvec_q8.reads(f16)
    q8 = Weight("w", GGMLQuantizationType.Q8_0, (4, 64), quant.quantize(torch.randn(4, 64), "Q8_0"))
    assert not matvec_q8.reads(q8, 1) and matvec_q8.reads(q8, 2), "Q8_0: the bf16 kernel at M = 1"
    with pytest.raises(AssertionError, match="does not read F16"):
        matvec_q8.matvec_q8(q8_1.quantize(torch.randn(1, 64, generator=gen)), f16)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from kiln.kernels import matvec_q8
from kiln.kernels.quantize import quantize_q8_1
from kiln.quant.q8_1 import Q8_1
from kiln.weight import Weight
from tests.kernels.sm90 import compile_only

with compile_only() as done:
    for qt in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        bv, ts = GGML_QUANT_SIZES[qt]
        w = Weight("w", qt, (4096, 4096), torch.zeros(4096, 4096 // bv * ts, dtype=torch.uint8))
        for m in (1, 2, 8):
            x = Q8_1(torch.zeros(m, 4096, dtype=torch.int8), torch.zeros(m, 128, 2))
            matvec_q8.matvec_q8(x, w)
        stack = torch.zeros(4, 1024, 4096 // bv * ts, dtype=torch.uint8)
        e = Weight("e", qt, (4, 1024, 4096), stack)
        ids = torch.zeros(2, 2, dtype=torch.int32)
        for rows in (2, 4):  # a row a token (k = 2 slots share it), a row a slot
            x = Q8_1(torch.zeros(rows, 4096, dtype=torch.int8), torch.zeros(rows, 128, 2))
            matvec_q8.expert_matvec_q8(x, ids, e)
    quantize_q8_1(torch.zeros(1, 4096))
    quantize_q8_1(torch.zeros(3, 576, dtype=torch.bfloat16))
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_matvec_q8_kernels_compile_for_sm90() -> None:
    """Every format at M = 1, 2, 8, its expert variant (x a row a token and a row a slot) and
    the quantize kernel compile for an H100 (dp4a as inline PTX, which the interpreter never
    sees)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_matvec_q8_kernel") == 24 + 16, out
    assert names.count("_quantize_q8_1_kernel") == 2, out

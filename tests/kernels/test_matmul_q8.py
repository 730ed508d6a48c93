"""The int8 tensor-core GEMM over q8_1 activations (kiln/kernels/matmul_q8.py) against
reference.linear of the dequantized activations, over a shape and tiling table: M = 1, 2, 8, 16
and 17 (a second row tile), ragged K steps, split-K with a short last split, N not a multiple of
the tile; real shapes on a GPU. Its sm_90 compile for every format.

On the CPU the kernel runs in Triton's interpreter on small shapes (the int8 dot as numpy's).
"""

from __future__ import annotations

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.kernels import matmul_q8
from kiln.kernels.matmul_q8 import MatmulQ8Config
from kiln.quant import q8_1
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec_q8 import FORMATS, check_int8_kernel
from tests.kernels.test_norm import ROOT

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _shapes(block: int) -> list[tuple[int, int, int, MatmulQ8Config | None]]:
    """(M, N, K, config)."""
    shapes = [
        (1, 17, 3 * block, None),  # 3 groups (legacy) in a step of 4: the step runs past K
        (2, 70, 2 * block, MatmulQ8Config(16, 16, 3, 1)),  # N past the tiles
        (8, 33, block, MatmulQ8Config(32, 16, 1, 2)),
        (3, 20, 5 * block, MatmulQ8Config(16, 16, 1, 1, splits=3)),  # a short last split
        (17, 20, 4 * block, MatmulQ8Config(16, 16, 2, 1, splits=2)),  # two row tiles
        (16, 9, 2 * block, None),
    ]
    if CUDA:
        shapes += [(m, 4096, 4096, None) for m in (1, 2, 8, 16)]
        shapes += [(2, 24576, 4096, None), (8, 4096, 12288, None), (5, 1024, 1024, None)]
    return shapes


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_q8_matches_reference(fmt: str) -> None:
    check_int8_kernel(fmt, _shapes, matmul_q8.reads, matmul_q8.matmul_q8, seed=13)


def test_split_k_is_deterministic_and_auto_splits_bounded() -> None:
    """The partial sums are added in split order: two launches give the same bits. auto_splits
    keeps at least 4 K steps a split and stops at TARGET_PROGRAMS."""
    gen = torch.Generator().manual_seed(2)
    w = Weight("w", GGMLQuantizationType.Q8_0, (20, 320),
               quant.quantize(torch.randn(20, 320, generator=gen), "Q8_0").to(DEVICE))  # fmt: skip
    x = q8_1.quantize(torch.randn(3, 320, generator=gen))
    x = q8_1.Q8_1(x.qs.to(DEVICE), x.ds.to(DEVICE))
    cfg = MatmulQ8Config(16, 16, 1, 1, splits=4)
    assert torch.equal(matmul_q8.matmul_q8(x, w, cfg), matmul_q8.matmul_q8(x, w, cfg))
    base = MatmulQ8Config(32, 16, 4, 1)
    assert matmul_q8.auto_splits(tiles=128, groups=128, cfg=base) == 4  # 512 programs
    assert matmul_q8.auto_splits(tiles=1, groups=128, cfg=base) == 8  # 32 steps / 4
    assert matmul_q8.auto_splits(tiles=1024, groups=128, cfg=base) == 1
    assert matmul_q8.auto_splits(tiles=4, groups=8, cfg=base) == 1  # 2 steps: no split


def test_matmul_q8_rejects_bad_input() -> None:
    gen = torch.Generator().manual_seed(0)
    w = Weight("w", GGMLQuantizationType.Q4_0, (4, 64), quant.quantize(torch.randn(4, 64), "Q4_0"))
    with pytest.raises(AssertionError, match="K=32"):
        matmul_q8.matmul_q8(q8_1.quantize(torch.randn(1, 32, generator=gen)), w)
    f16 = Weight("w", GGMLQuantizationType.F16, (4, 64), quant.quantize(torch.randn(4, 64), "F16"))
    assert not matmul_q8.reads(f16)
    with pytest.raises(AssertionError, match="does not read F16"):
        matmul_q8.matmul_q8(q8_1.quantize(torch.randn(1, 64, generator=gen)), f16)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from kiln.kernels import matmul_q8
from kiln.quant.q8_1 import Q8_1
from kiln.weight import Weight
from tests.kernels.sm90 import compile_only

with compile_only() as done:
    for qt in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        bv, ts = GGML_QUANT_SIZES[qt]
        w = Weight("w", qt, (4096, 4096), torch.zeros(4096, 4096 // bv * ts, dtype=torch.uint8))
        for m in (2, 8, 33):
            x = Q8_1(torch.zeros(m, 4096, dtype=torch.int8), torch.zeros(m, 128, 2))
            matmul_q8.matmul_q8(x, w)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_matmul_q8_compiles_for_sm90() -> None:
    """Every format at M = 2, 8 (one 16-row tile) and 33 (32-row tiles) compiles for an H100:
    int8 tl.dot (mma s8) is what the interpreter runs as numpy."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_matmul_q8_kernel") == 24, out

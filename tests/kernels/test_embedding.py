"""kiln.kernels.embedding against kiln.ops.reference.embedding on randomly quantized weights.

The kernel dequantizes with the reference's fp32 operations in the same order and FMA
contraction off, so the rows must be bit-exact (compared as int32 bits): no tolerance entry.
Outputs are allocated poisoned (NaN) so a value the kernel does not write fails. On the CPU this
runs through Triton's interpreter on small shapes; on a GPU the same cases add real vocabulary
sizes (V = 151936, K = 1024 and 4096: the f32 table's last row starts past 2**31 bytes).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.ops.reference import embedding as reference
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.test_router import _PoisonedTorch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]

FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
V = 33  # odd vocabulary: rows 0 and V - 1 are looked up
# ids per case: one token; three with a repeat; the first and last rows.
IDS = ([7], [32, 0, 32], [0, 5, V - 1, 5])
REAL_V = 151936  # qwen3's vocabulary


def _kernels():
    from kiln.kernels import embedding

    if not CUDA and not embedding._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return embedding


@pytest.fixture
def launcher(monkeypatch):
    """kiln.kernels.embedding, with its output allocated poisoned (NaN)."""
    mod = _kernels()
    monkeypatch.setattr(mod, "torch", _PoisonedTorch())
    return mod


def _ks(fmt: str) -> tuple[int, ...]:
    """K = 256 and 512 for every format, and one the tile does not divide: 3 super-blocks (768,
    2 programs, the second half past the row), 3 legacy blocks (96: a 128-value tile), 511
    floats (masked)."""
    block = quant.get_format(fmt).block_size
    return (256, 512, {1: 511, 32: 96, 256: 768}[block])


def _weight(fmt: str, v: int, k: int, gen: torch.Generator) -> Weight:
    qtype = GGMLQuantizationType[fmt]
    raw = quant.quantize(torch.randn(v, k, generator=gen), qtype).to(DEVICE)
    return Weight(f"token_embd_{fmt}", qtype, (v, k), raw)


def _check_bits(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-exact: value mismatches reported by _check (worst index, count, NaN/inf), then the
    bits (-0.0 against 0.0, NaN payloads)."""
    _check(y, ref, torch.zeros_like(ref), what)
    same = y.view(torch.int32) == ref.view(torch.int32)
    assert bool(same.all()), f"{what}: {int((~same).sum())} values differ in their bits only"


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_matches_reference(fmt: str, launcher) -> None:
    gen = torch.Generator().manual_seed(1234)
    for k in _ks(fmt):
        w = _weight(fmt, V, k, gen)
        for i, rows in enumerate(IDS):
            dtype = (torch.int64, torch.int32)[i % 2]
            ids = torch.tensor(rows, dtype=dtype, device=DEVICE)
            y = launcher.embedding(w, ids, pdl=i == 2)  # pdl is off under the interpreter
            assert y.shape == (len(rows), k) and y.dtype == torch.float32, y.shape
            _check_bits(y, reference(w, ids), f"{fmt} V={V} K={k} ids={rows} {dtype}")


def test_embedding_padded_rows(launcher) -> None:
    """Rows further apart than their bytes (a row stride the launcher passes through), for a
    float view and a block format."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([3, 0, 3], device=DEVICE)
    for fmt, k in (("F16", 96), ("Q4_1", 96), ("Q6_K", 256)):
        w = _weight(fmt, 9, k, gen)
        row_bytes = w.raw.shape[1]
        big = torch.zeros(9, row_bytes + 16, dtype=torch.uint8, device=DEVICE)
        big[:, :row_bytes] = w.raw
        padded = Weight(w.name, w.qtype, w.shape, big[:, :row_bytes])
        _check_bits(launcher.embedding(padded, ids), reference(w, ids), f"{fmt} padded rows")


def test_embedding_no_tokens(launcher) -> None:
    gen = torch.Generator().manual_seed(0)
    w = _weight("Q8_0", V, 64, gen)
    y = launcher.embedding(w, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert y.shape == (0, 64) and y.dtype == torch.float32


def test_embedding_rejects_bad_input() -> None:
    launcher = _kernels()
    gen = torch.Generator().manual_seed(0)
    w = _weight("Q8_0", 4, 64, gen)
    with pytest.raises(AssertionError, match="int32/int64"):
        launcher.embedding(w, torch.zeros(2, device=DEVICE))
    with pytest.raises(AssertionError, match="1-D"):
        launcher.embedding(w, torch.zeros(1, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous"):
        launcher.embedding(w, torch.zeros(4, dtype=torch.int64, device=DEVICE)[::2])
    stacked = Weight("e", w.qtype, (1, 4, 64), w.raw[None])
    with pytest.raises(AssertionError, match="2-D"):
        launcher.embedding(stacked, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    q2k = Weight("q", GGMLQuantizationType.Q2_K, (4, 256), torch.zeros(4, 84, dtype=torch.uint8))
    with pytest.raises(AssertionError, match="Q2_K"):
        launcher.embedding(q2k, torch.zeros(1, dtype=torch.int64))
    short = Weight(w.name, w.qtype, (4, 96), w.raw)
    with pytest.raises(AssertionError, match="does not hold"):
        launcher.embedding(short, torch.zeros(1, dtype=torch.int64, device=DEVICE))


@pytest.mark.skipif(not CUDA, reason="real vocabulary sizes only on a GPU")
@pytest.mark.parametrize("k", (1024, 4096))
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_real_sizes(fmt: str, k: int) -> None:
    """A [151936, K] table of random bytes whose looked-up rows (the first, the last, and ones
    in between) are properly quantized: a wrong row reads bytes no reference row has."""
    launcher = _kernels()
    gen = torch.Generator().manual_seed(k)
    qtype = GGMLQuantizationType[fmt]
    rows = [0, REAL_V - 1, 77777, 123, 77777]
    good = quant.quantize(torch.randn(len(rows), k, generator=gen), qtype).to(DEVICE)
    raw = torch.randint(0, 256, (REAL_V, good.shape[1]), dtype=torch.uint8, device=DEVICE)
    raw[rows] = good
    w = Weight(f"token_embd_{fmt}", qtype, (REAL_V, k), raw)
    for ids in (rows[:1], rows[1:2], rows):
        t = torch.tensor(ids, dtype=torch.int64, device=DEVICE)
        y = launcher.embedding(w, t)
        _check_bits(y, reference(w, t), f"{fmt} V={REAL_V} K={k} ids={ids}")


# Every format at qwen3's vocabulary with K = 4096 (and K = 1024 for one legacy and one K-quant
# format), pdl off and on, with int64 ids (int32 once): kernel name, PDL launch and wait, and
# the PTX's FMAs (none: the launcher turns contraction off so Q4_1, Q5_1 and the K-quants stay
# bit-exact with the reference).
_COMPILE = textwrap.dedent(
    """
    import re, sys
    sys.path.insert(0, {root!r})
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from triton.runtime.jit import JITFunction
    from kiln.kernels import embedding
    from kiln.kernels.formats import SUPPORT
    from kiln.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, v, k):
        bv, ts = GGML_QUANT_SIZES[q]
        return Weight("w", q, (v, k), torch.empty(v, k // bv * ts, dtype=torch.uint8))

    fmts = sorted(SUPPORT["embedding"], key=lambda q: q.name)
    runs = [(q, 4096, pdl, torch.int64) for q in fmts for pdl in (False, True)]
    runs += [(q, 1024, True, torch.int64) for q in (T.Q8_0, T.Q4_K)]
    runs += [(T.Q6_K, 4096, True, torch.int32)]
    with compile_only() as done:
        compile_instead = JITFunction.run
        ptx = []

        def run(self, *args, **kwargs):
            kernel = compile_instead(self, *args, **kwargs)
            ptx.append(kernel.asm["ptx"])
            return kernel

        JITFunction.run = run
        for q, k, pdl, id_dtype in runs:
            embedding.embedding(weight(q, {v}, k), torch.zeros(1, dtype=id_dtype), pdl=pdl)
            c = done[-1]
            fma = len(re.findall(r"\\bfma\\.", ptx[-1]))
            print(q.name, k, pdl, c.kernel, c.launch_pdl, c.waits, fma, c.shared_bytes)
    """
)


def test_embedding_compiles_for_sm90() -> None:
    from kiln.kernels.formats import SUPPORT

    SUPPORTED = SUPPORT["embedding"]
    out = run_compile_check(_COMPILE.format(root=str(ROOT), v=REAL_V))
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 * len(SUPPORTED) + 3, out
    seen = set()
    for fmt, k, pdl, kernel, launch_pdl, waits, fma, _shared in lines:
        what = f"{fmt} K={k} pdl={pdl}"
        assert kernel == "_embedding_kernel", f"{what}: compiled {kernel}"
        assert launch_pdl == waits == pdl, f"{what}: launch_pdl={launch_pdl} waits={waits}"
        assert fma == "0", f"{what}: {fma} FMAs in the PTX (contraction must be off)"
        seen.add((fmt, pdl))
    want = {(q.name, p) for q in SUPPORTED for p in ("False", "True")}
    assert seen == want, sorted(want - seen)

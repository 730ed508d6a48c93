"""kiln.kernels.rope.qkv_norm_rope against kiln.ops.reference.qkv_norm_rope: the returned q, the
K/V cache rows at the positions, and every other cache row left untouched.

On the CPU this runs through Triton's interpreter (tests/kernels/conftest.py) on small shapes; on
a GPU the same cases add qwen3/llama shapes, long positions and a CUDA-graph replay.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.ops import reference
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.test_norm import _norm_weight
from tests.kernels.tolerances import DECODE_FUSIONS

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-6
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ids = {"ids": lambda d: str(d).removeprefix("torch.")}

# (T, H, Hkv, D, Dv, rot, C): T = 1 and 3, rot < D, Dv != D, non-power-of-two D; real ones on a
# GPU (qwen3 D = 128 with 16/32/64 heads, llama D = 64 and 128, a 40k-entry cache).
SHAPES = [
    (1, 4, 2, 64, 64, 64, 9),
    (3, 4, 2, 64, 64, 32, 4099),  # positions up to 4098: angles of thousands of radians
    (3, 3, 1, 48, 40, 48, 7),
]
if CUDA:
    SHAPES += [
        (1, 16, 8, 128, 128, 128, 4096),
        (1, 32, 8, 128, 128, 128, 40960),
        (1, 64, 4, 128, 128, 128, 4096),
        (1, 32, 8, 64, 64, 64, 4096),
        (5, 32, 8, 128, 128, 64, 4096),
        (512, 32, 8, 128, 128, 128, 4096),
    ]


def _kernels():
    from kiln.kernels import rope

    if not CUDA and not rope._INTERPRETED:
        pytest.skip("the kernel was compiled before TRITON_INTERPRET=1 was set (no CUDA here)")
    return rope


def _positions(t: int, c: int) -> torch.Tensor:
    """Distinct cache rows, unsorted, including the first and the last."""
    if t == 1:
        return torch.tensor([c - 1], device=DEVICE)
    pos = [c - 1, 0] + [(7 * i + 3) % (c - 1) + 1 for i in range(t - 2)]
    assert len(set(pos)) == t, pos
    return torch.tensor(pos, device=DEVICE)


def _merged(t, h, hkv, d, dv, dtype, gen):
    """q, k, v: views of one merged QKV result [T, H D + Hkv D + Hkv Dv] (token stride = row)."""
    qkv = (2 * torch.randn(t, h * d + hkv * (d + dv), generator=gen)).to(dtype).to(DEVICE)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, dv)
    return q, k, v


def _pair_magnitude(x: torch.Tensor, rot: int, neox: bool) -> torch.Tensor:
    """|x_d| + |x_partner(d)| for rotated dims, |x_d| past rot: the size of the terms of the
    rotation, against which its error is measured (a cos - b sin can cancel to ~0)."""
    d = torch.arange(x.shape[-1], device=x.device)
    if neox:
        half = rot // 2
        partner = torch.where(d < half, d + half, d - half)
    else:
        partner = d ^ 1
    partner = torch.where(d < rot, partner, d)
    mag = x.abs() + x[..., partner].abs()
    return torch.where(d < rot, mag, x.abs())


def _normed(x, weight):
    return reference.rms_norm(x, weight, EPS) if weight is not None else x.float()


def _run_case(rope, shape, cache_dtype, neox, with_norm, act, gen, what_prefix=""):
    t, h, hkv, d, dv, rot, c = shape
    q, k, v = _merged(t, h, hkv, d, dv, act, gen)
    qw = _norm_weight(d, gen) if with_norm else None
    kw = _norm_weight(d, gen) if with_norm else None
    freqs = reference.rope_frequencies(rot, 10000.0, None, DEVICE)
    positions = _positions(t, c)
    k_cache = torch.randn(c, hkv, d, generator=gen).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(c, hkv, dv, generator=gen).to(cache_dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out = rope.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, freqs, neox, k_cache, v_cache)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, freqs, neox, k_ref, v_ref)
    what = (
        f"{what_prefix}T={t} H={h} Hkv={hkv} D={d} Dv={dv} rot={rot} neox={neox} "
        f"norm={with_norm} cache:{str(cache_dtype).removeprefix('torch.')} x:{act}"
    )
    rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope"]
    _check(out, ref, atol + rtol * _pair_magnitude(_normed(q, qw), rot, neox), what + " q")

    rtol, atol, _ = DECODE_FUSIONS[f"qkv_norm_rope.cache.{str(cache_dtype).removeprefix('torch.')}"]
    rows = positions.long()
    k_mag = _pair_magnitude(_normed(k, kw), rot, neox)
    _check(k_cache[rows].float(), k_ref[rows].float(), atol + rtol * k_mag, what + " k_cache")
    # V is only converted to the cache dtype (round to nearest even): exact.
    assert torch.equal(v_cache[rows], v_ref[rows]), what + ": v_cache rows differ"
    others = torch.ones(c, dtype=torch.bool, device=DEVICE)
    others[rows] = False
    assert torch.equal(k_cache[others], k_before[others]), what + ": other k_cache rows changed"
    assert torch.equal(v_cache[others], v_before[others]), what + ": other v_cache rows changed"


@pytest.mark.parametrize("with_norm", (True, False), ids=("norm", "no_norm"))
@pytest.mark.parametrize("neox", (False, True), ids=("pairs", "neox"))
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, **_ids)
def test_qkv_norm_rope_matches_reference(cache_dtype, neox, with_norm) -> None:
    rope = _kernels()
    gen = torch.Generator().manual_seed(21)
    for shape in SHAPES:
        _run_case(rope, shape, cache_dtype, neox, with_norm, torch.float32, gen)


@pytest.mark.parametrize("act", (torch.float16, torch.bfloat16), **_ids)
def test_qkv_norm_rope_half_inputs(act) -> None:
    """A QKV result in f16/bf16 (converted exactly to fp32 first), into an f16 and a bf16 cache."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(22)
    for cache_dtype in (torch.float16, torch.bfloat16):
        _run_case(rope, SHAPES[1], cache_dtype, True, True, act, gen)
        _run_case(rope, SHAPES[2], cache_dtype, False, False, act, gen)


def test_qkv_norm_rope_rejects_bad_input() -> None:
    rope = _kernels()
    gen = torch.Generator().manual_seed(23)
    q, k, v = _merged(1, 4, 2, 64, 64, torch.float32, gen)
    w = _norm_weight(64, gen)
    freqs = reference.rope_frequencies(64, 10000.0, None, DEVICE)
    pos = torch.tensor([0], device=DEVICE)
    kc = torch.zeros(4, 2, 64, device=DEVICE)
    vc = torch.zeros(4, 2, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="both Q and K norm weights"):
        rope.qkv_norm_rope(q, k, v, w, None, EPS, pos, freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="int64"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos.int(), freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="rotates 128 dims"):
        big = reference.rope_frequencies(128, 10000.0, None, DEVICE)
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, big, False, kc, vc)
    with pytest.raises(AssertionError, match="k_cache"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, freqs, False, kc[:, :1], vc)
    spread = torch.zeros(1, 4, 2, 64, device=DEVICE)[:, :, 0]  # head stride 128, not D = 64
    with pytest.raises(AssertionError, match="heads must be packed"):
        rope.qkv_norm_rope(spread, k, v, w, w, EPS, pos, freqs, False, kc, vc)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_qkv_norm_rope_cuda_graph_replay() -> None:
    """Captured once, replayed at new positions written into the same device tensor."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(24)
    t, h, hkv, d, c = 1, 32, 8, 128, 64
    q, k, v = _merged(t, h, hkv, d, d, torch.float32, gen)
    qw, kw = _norm_weight(d, gen), _norm_weight(d, gen)
    freqs = reference.rope_frequencies(d, 1e6, None, DEVICE)
    positions = torch.zeros(t, dtype=torch.int64, device=DEVICE)
    k_cache = torch.zeros(c, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros(c, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    rope.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, freqs, True, k_cache, v_cache)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, freqs, True, k_cache, v_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    for p in (5, 17, 63):
        positions.fill_(p)
        graph.replay()
        ref = reference.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, freqs, True, k_ref, v_ref)
        rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope"]
        _check(out, ref, atol + rtol * _pair_magnitude(_normed(q, qw), d, True), f"replay p={p}")
        rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope.cache.bfloat16"]
        mag = _pair_magnitude(_normed(k, kw), d, True)
        _check(k_cache[p].float(), k_ref[p].float(), atol + rtol * mag[0], f"replay k_cache p={p}")
        assert torch.equal(v_cache[p], v_ref[p])
    torch.cuda.synchronize()


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from gguf.constants import GGMLQuantizationType
from kiln.kernels import rope
from kiln.ops.weight import Weight
from tests.kernels.sm90 import compile_only

def w(n):
    return Weight("w", GGMLQuantizationType.F32, (n,), torch.ones(n).view(torch.uint8))

def qkv(t, h, hkv, d, dtype=torch.float32):
    x = torch.zeros(t, (h + 2 * hkv) * d, dtype=dtype)
    return (x[:, : h * d].view(t, h, d), x[:, h * d : (h + hkv) * d].view(t, hkv, d),
            x[:, (h + hkv) * d :].view(t, hkv, d))

with compile_only() as done:
    q, k, v = qkv(1, 32, 8, 128)  # qwen3-8B
    pos = torch.zeros(1, dtype=torch.int64)
    freqs = torch.ones(64)
    for cache in (torch.float16, torch.bfloat16, torch.float32):
        for neox in (False, True):
            for has_norm in (False, True):
                kc = torch.zeros(4096, 8, 128, dtype=cache)
                vc = torch.zeros(4096, 8, 128, dtype=cache)
                nw = w(128) if has_norm else None
                rope.qkv_norm_rope(q, k, v, nw, nw, 1e-6, pos, freqs, neox, kc, vc)
    # llama 3.2 1B (D = 64, no norm), rot < D, and a bf16 QKV result
    q, k, v = qkv(1, 32, 8, 64, torch.bfloat16)
    kc = torch.zeros(4096, 8, 64, dtype=torch.float16)
    vc = torch.zeros(4096, 8, 64, dtype=torch.float16)
    rope.qkv_norm_rope(q, k, v, None, None, 1e-5, pos, torch.ones(32), False, kc, vc)
    rope.qkv_norm_rope(q, k, v, None, None, 1e-5, pos, torch.ones(16), True, kc, vc)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_rope_kernel_compiles_for_sm90() -> None:
    """Every launched variant (cache dtype x NEOX x HAS_NORM, D = 64/128, rot < D, bf16 input)
    compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_qkv_norm_rope_kernel") == 14, out
    print(out)

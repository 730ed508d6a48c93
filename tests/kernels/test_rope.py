"""kiln.kernels.rope.qkv_norm_rope against kiln.ops.reference.qkv_norm_rope: the returned q
(rotated at the positions), the K/V pool rows at the slots (a shuffled permutation of the pool
rows, no slot equal to its token's position), and every other pool row left untouched.

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
from tests.kernels.test_norm import EPS_CASES, _norm_weight
from tests.kernels.tolerances import DECODE_FUSIONS, rotated_bound

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
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return rope


def _positions(t: int, c: int) -> torch.Tensor:
    """Distinct cache rows, unsorted, including the first and the last."""
    if t == 1:
        return torch.tensor([c - 1], device=DEVICE)
    pos = [c - 1, 0] + [(7 * i + 3) % (c - 1) + 1 for i in range(t - 2)]
    assert len(set(pos)) == t, pos
    return torch.tensor(pos, device=DEVICE)


def _slots(positions: torch.Tensor, c: int, seed: int) -> torch.Tensor:
    """Each token's pool row: positions mapped through a random c-cycle (a permutation of the c
    rows without fixed points), so the slots are distinct, shuffled, and none equals its
    position."""
    order = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    cycle = torch.empty(c, dtype=torch.int64)
    cycle[order] = order.roll(-1)
    slots = cycle.to(positions.device)[positions]
    assert bool((slots != positions).all()) and slots.unique().numel() == slots.numel()
    return slots


def _merged(t, h, hkv, d, dv, dtype, gen, scale=2.0):
    """q, k, v: views of one merged QKV result [T, H D + Hkv D + Hkv Dv] (token stride = row)."""
    qkv = (scale * torch.randn(t, h * d + hkv * (d + dv), generator=gen)).to(dtype).to(DEVICE)
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


def _normed(x, weight, eps=EPS):
    return reference.rms_norm(x, weight, eps) if weight is not None else x.float()


def _run_case(
    rope, shape, cache_dtype, neox, with_norm, act, gen, what_prefix="", eps=EPS, scale=2.0
):
    t, h, hkv, d, dv, rot, c = shape
    q, k, v = _merged(t, h, hkv, d, dv, act, gen, scale)
    qw = _norm_weight(d, gen) if with_norm else None
    kw = _norm_weight(d, gen) if with_norm else None
    freqs = reference.rope_frequencies(rot, 10000.0, None, DEVICE)
    positions = _positions(t, c)
    slots = _slots(positions, c, t * c + d)
    k_cache = torch.randn(c, hkv, d, generator=gen).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(c, hkv, dv, generator=gen).to(cache_dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_before, v_before = k_cache.clone(), v_cache.clone()

    args = (eps, positions, slots, freqs, neox)
    out = rope.qkv_norm_rope(q, k, v, qw, kw, *args, k_cache, v_cache)
    ref = reference.qkv_norm_rope(q, k, v, qw, kw, *args, k_ref, v_ref)
    what = (
        f"{what_prefix}T={t} H={h} Hkv={hkv} D={d} Dv={dv} rot={rot} neox={neox} "
        f"norm={with_norm} cache:{str(cache_dtype).removeprefix('torch.')} x:{act} eps={eps}"
    )
    rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope"]
    _check(out, ref, atol + rtol * _pair_magnitude(_normed(q, qw, eps), rot, neox), what + " q")

    rtol, atol, _ = DECODE_FUSIONS[f"qkv_norm_rope.cache.{str(cache_dtype).removeprefix('torch.')}"]
    rows = slots
    k_mag = _pair_magnitude(_normed(k, kw, eps), rot, neox)
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


@pytest.mark.parametrize("v_type", ("q8_0", "q4_0", "f16"))
@pytest.mark.parametrize("k_type", ("q8_0", "q4_0"))
def test_quantized_cache_rows(k_type: str, v_type: str) -> None:
    """Block-type pools (-ctk/-ctv q8_0, q4_0): the kernel quantizes the rows it writes as
    kiln.quant.kv.write_rows does. V is copied, so its bytes equal the reference's; K is normed
    and rotated (fp32 rounding may move a value across a rounding boundary), so its values are
    within one quantization step of the reference's. Other rows stay as they were. Where K is
    stored rotated (head sizes of 64s) q comes back rotated too, as the reference returns it."""
    from kiln.quant.kv import cache_type

    rope = _kernels()
    gen = torch.Generator().manual_seed(23)
    for t, h, hkv, d, rot, c in ((5, 4, 2, 64, 64, 24), (3, 8, 2, 128, 96, 16)):
        q, k, v = _merged(t, h, hkv, d, d, torch.float32, gen, 2.0)
        qw, kw = _norm_weight(d, gen), _norm_weight(d, gen)
        freqs = reference.rope_frequencies(rot, 10000.0, None, DEVICE)
        positions = _positions(t, c)
        slots = _slots(positions, c, 7 * t + d)
        kt, vt = cache_type(k_type), cache_type(v_type)
        pools = [kt.allocate(c, hkv, d, DEVICE), vt.allocate(c, hkv, d, DEVICE)]
        refs = [kt.allocate(c, hkv, d, DEVICE), vt.allocate(c, hkv, d, DEVICE)]
        args = (1e-6, positions, slots, freqs, False)
        out = rope.qkv_norm_rope(q, k, v, qw, kw, *args, *pools)
        ref = reference.qkv_norm_rope(q, k, v, qw, kw, *args, *refs)
        what = f"K {k_type} V {v_type} T={t} D={d} rot={rot}"
        rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope"]
        mag = _pair_magnitude(_normed(q, qw), rot, False)
        bound = atol + rtol * mag
        if pools[0].rotated:  # q returned rotated like K
            bound = rotated_bound(bound, mag)
        _check(out, ref, bound, what + " q")
        got, want = pools[0][slots].float(), refs[0][slots].float()
        blocks = want.reshape(t, hkv, d // 32, 32).abs().amax(-1, keepdim=True)
        step = (blocks / (127.0 if k_type == "q8_0" else 8.0)).expand(-1, -1, -1, 32)
        _check(got, want, 1e-5 + 1.01 * step.reshape(t, hkv, d), what + " k_cache")
        v_data = (pools[1].data if v_type != "f16" else pools[1])[slots]
        v_want = (refs[1].data if v_type != "f16" else refs[1])[slots]
        assert torch.equal(v_data, v_want), what + ": v_cache rows differ"
        others = torch.ones(c, dtype=torch.bool, device=DEVICE)
        others[slots] = False
        assert not pools[0].data[others].any(), what + ": other k_cache rows changed"


@pytest.mark.parametrize("act", (torch.float16, torch.bfloat16), **_ids)
def test_qkv_norm_rope_half_inputs(act) -> None:
    """A QKV result in f16/bf16 (converted exactly to fp32 first), into an f16 and a bf16 cache."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(22)
    for cache_dtype in (torch.float16, torch.bfloat16):
        _run_case(rope, SHAPES[1], cache_dtype, True, True, act, gen)
        _run_case(rope, SHAPES[2], cache_dtype, False, False, act, gen)


@pytest.mark.parametrize(("scale", "eps"), EPS_CASES, ids=("small_x", "large_eps", "zero_rows"))
def test_qkv_norm_rope_where_eps_matters(scale: float, eps: float) -> None:
    """The Q/K RMSNorm inside the fused kernel on inputs where eps is a large part of the mean
    square (tests/kernels/test_norm.py's EPS_CASES)."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(25)
    for shape in (SHAPES[0], SHAPES[2]):
        for cache_dtype in (torch.float32, torch.float16):
            _run_case(
                rope, shape, cache_dtype, True, True, torch.float32, gen, eps=eps, scale=scale
            )


def _ties(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values at, just above and just below the midpoint of two neighbouring f16/bf16
    values, with what rounding to nearest even makes of them: (values [64], rounded [64])."""
    u = 2.0**-10 if dtype == torch.float16 else 2.0**-7  # the ulp of 1.0
    tiny = 2.0**-20  # exact in fp32 next to 1.0
    pairs = [
        (1 + u / 2, 1.0),  # tie: down to the even 1.0 (round half up would give 1 + u)
        (1 + 3 * u / 2, 1 + 2 * u),  # tie: up to the even 1 + 2u (truncation gives 1 + u)
        (1 + u / 2 + tiny, 1 + u),  # above the midpoint: up (truncation gives 1.0)
        (1 + u / 2 - tiny, 1.0),  # below the midpoint: down
        (1 + u + tiny, 1 + u),
    ]
    values, rounded = [], []
    for scale in (2.0**-3, 1.0, 2.0**4):
        for sign in (1.0, -1.0):
            for x, r in pairs:
                values.append(sign * scale * x)
                rounded.append(sign * scale * r)
    values += [0.5] * (64 - len(values))
    rounded += [0.5] * (64 - len(rounded))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(rounded, dtype=torch.float32)


@pytest.mark.parametrize("cache_dtype", (torch.float16, torch.bfloat16), **_ids)
def test_cache_write_rounds_to_nearest_even(cache_dtype) -> None:
    """K and V rows of exactly known fp32 values (position 0 rotates by angle 0: cos 1, sin 0,
    no norm) land in an f16/bf16 cache rounded to nearest, ties to even: the kernel and the
    reference, against values worked out by hand (the random-input test's bound allows an ulp
    either way, so only some of its values can tell truncation or ties away from zero from
    rounding to nearest even)."""
    rope = _kernels()
    values, rounded = _ties(cache_dtype)
    want = rounded.to(cache_dtype).to(DEVICE)
    assert torch.equal(want.float().cpu(), rounded), "the hand-rounded values are representable"
    h, hkv, d = 2, 2, 64
    q = values.expand(1, h, d).clone().to(DEVICE)
    k = values.expand(1, hkv, d).clone().to(DEVICE)
    v = (-values).expand(1, hkv, d).clone().to(DEVICE)
    freqs = reference.rope_frequencies(d, 10000.0, None, DEVICE)
    pos = torch.tensor([0], device=DEVICE)
    slot = torch.tensor([1], device=DEVICE)
    for name, fn in (("kernel", rope.qkv_norm_rope), ("reference", reference.qkv_norm_rope)):
        for neox in (False, True):
            kc = torch.zeros(2, hkv, d, dtype=cache_dtype, device=DEVICE)
            vc = torch.zeros(2, hkv, d, dtype=cache_dtype, device=DEVICE)
            out = fn(q, k, v, None, None, EPS, pos, slot, freqs, neox, kc, vc)
            what = f"{name} neox={neox} {cache_dtype}"
            assert torch.equal(out.cpu(), q.cpu()), what + ": angle 0 must leave q as it is"
            rows = ((kc[1, 0], values, want), (kc[1, 1], values, want), (vc[1, 0], -values, -want))
            for row, x, w in rows:
                bad = (row != w).nonzero().flatten().tolist()
                assert not bad, (
                    f"{what}: {x[bad[0]].item()!r} stored as {row[bad[0]].item()!r}, "
                    f"want {w[bad[0]].item()!r} (round to nearest even); {len(bad)} such"
                )


@pytest.mark.parametrize("cache_dtype", (torch.float16, torch.bfloat16), **_ids)
def test_cache_write_is_the_f32_result_rounded_to_nearest_even(cache_dtype) -> None:
    """At any position and with the norm, the f16/bf16 cache row is exactly the kernel's own fp32
    row (what it writes into an f32 cache) rounded to nearest even, for K and V."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(26)
    t, h, hkv, d, dv, rot, c = SHAPES[1]
    for with_norm in (True, False):
        q, k, v = _merged(t, h, hkv, d, dv, torch.float32, gen)
        qw = _norm_weight(d, gen) if with_norm else None
        kw = _norm_weight(d, gen) if with_norm else None
        freqs = reference.rope_frequencies(rot, 10000.0, None, DEVICE)
        positions = _positions(t, c)
        slots = _slots(positions, c, 27)
        caches = {}
        for dtype in (torch.float32, cache_dtype):
            kc = torch.zeros(c, hkv, d, dtype=dtype, device=DEVICE)
            vc = torch.zeros(c, hkv, dv, dtype=dtype, device=DEVICE)
            rope.qkv_norm_rope(q, k, v, qw, kw, EPS, positions, slots, freqs, True, kc, vc)
            caches[dtype] = (kc[slots], vc[slots])
        (k32, v32), (kh, vh) = caches[torch.float32], caches[cache_dtype]
        what = f"norm={with_norm} {cache_dtype}"
        assert torch.equal(kh, k32.to(cache_dtype)), what + ": k_cache is not the f32 row, RNE"
        assert torch.equal(vh, v32.to(cache_dtype)), what + ": v_cache is not the f32 row, RNE"


def test_qkv_norm_rope_rejects_bad_input() -> None:
    rope = _kernels()
    gen = torch.Generator().manual_seed(23)
    q, k, v = _merged(1, 4, 2, 64, 64, torch.float32, gen)
    w = _norm_weight(64, gen)
    freqs = reference.rope_frequencies(64, 10000.0, None, DEVICE)
    pos = torch.tensor([0], device=DEVICE)
    slot = torch.tensor([2], device=DEVICE)
    kc = torch.zeros(4, 2, 64, device=DEVICE)
    vc = torch.zeros(4, 2, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="both Q and K norm weights"):
        rope.qkv_norm_rope(q, k, v, w, None, EPS, pos, slot, freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="positions must be int64"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos.int(), slot, freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="slots must be int64"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, slot.int(), freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="slots must be int64"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, slot.repeat(2), freqs, False, kc, vc)
    with pytest.raises(AssertionError, match="rotates 128 dims"):
        big = reference.rope_frequencies(128, 10000.0, None, DEVICE)
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, slot, big, False, kc, vc)
    with pytest.raises(AssertionError, match="k_cache"):
        rope.qkv_norm_rope(q, k, v, w, w, EPS, pos, slot, freqs, False, kc[:, :1], vc)
    spread = torch.zeros(1, 4, 2, 64, device=DEVICE)[:, :, 0]  # head stride 128, not D = 64
    with pytest.raises(AssertionError, match="heads must be packed"):
        rope.qkv_norm_rope(spread, k, v, w, w, EPS, pos, slot, freqs, False, kc, vc)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_qkv_norm_rope_cuda_graph_replay() -> None:
    """Captured once, replayed at new positions and slots written into the same device tensors;
    each replay writes its slot's rows only."""
    rope = _kernels()
    gen = torch.Generator().manual_seed(24)
    t, h, hkv, d, c = 1, 32, 8, 128, 64
    q, k, v = _merged(t, h, hkv, d, d, torch.float32, gen)
    qw, kw = _norm_weight(d, gen), _norm_weight(d, gen)
    freqs = reference.rope_frequencies(d, 1e6, None, DEVICE)
    positions = torch.zeros(t, dtype=torch.int64, device=DEVICE)
    slots = torch.zeros(t, dtype=torch.int64, device=DEVICE)
    k_cache = torch.zeros(c, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros(c, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    args = (EPS, positions, slots, freqs, True)
    rope.qkv_norm_rope(q, k, v, qw, kw, *args, k_cache, v_cache)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope.qkv_norm_rope(q, k, v, qw, kw, *args, k_cache, v_cache)
    for p, s in ((5, 40), (17, 3), (63, 0), (1000, 63)):
        positions.fill_(p)
        slots.fill_(s)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        graph.replay()
        ref = reference.qkv_norm_rope(q, k, v, qw, kw, *args, k_ref, v_ref)
        rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope"]
        _check(out, ref, atol + rtol * _pair_magnitude(_normed(q, qw), d, True), f"replay p={p}")
        rtol, atol, _ = DECODE_FUSIONS["qkv_norm_rope.cache.bfloat16"]
        mag = _pair_magnitude(_normed(k, kw), d, True)
        _check(k_cache[s].float(), k_ref[s].float(), atol + rtol * mag[0], f"replay k p={p} s={s}")
        assert torch.equal(v_cache[s], v_ref[s])
        others = torch.arange(c, device=DEVICE) != s
        assert torch.equal(k_cache[others], k_ref[others]), f"replay s={s}: other rows changed"
        assert torch.equal(v_cache[others], v_ref[others]), f"replay s={s}: other rows changed"
    torch.cuda.synchronize()


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from gguf.constants import GGMLQuantizationType
from kiln.kernels import rope
from kiln.weight import Weight
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
    slot = torch.ones(1, dtype=torch.int64)
    freqs = torch.ones(64)
    for cache in (torch.float16, torch.bfloat16, torch.float32):
        for neox in (False, True):
            for has_norm in (False, True):
                kc = torch.zeros(4096, 8, 128, dtype=cache)
                vc = torch.zeros(4096, 8, 128, dtype=cache)
                nw = w(128) if has_norm else None
                rope.qkv_norm_rope(q, k, v, nw, nw, 1e-6, pos, slot, freqs, neox, kc, vc)
    # llama 3.2 1B (D = 64, no norm), rot < D, and a bf16 QKV result
    q, k, v = qkv(1, 32, 8, 64, torch.bfloat16)
    kc = torch.zeros(4096, 8, 64, dtype=torch.float16)
    vc = torch.zeros(4096, 8, 64, dtype=torch.float16)
    rope.qkv_norm_rope(q, k, v, None, None, 1e-5, pos, slot, torch.ones(32), False, kc, vc)
    rope.qkv_norm_rope(q, k, v, None, None, 1e-5, pos, slot, torch.ones(16), True, kc, vc)
    # block-type pools (-ctk/-ctv q8_0, q4_0), D = 128 and 64
    from kiln.quant.kv import cache_type
    for d in (128, 64):
        q, k, v = qkv(1, 32, 8, d)
        for kt, vt in (("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")):
            kc = cache_type(kt).allocate(4096, 8, d, torch.device("cpu"))
            vc = cache_type(vt).allocate(4096, 8, d, torch.device("cpu"))
            half = torch.ones(d // 2)
            rope.qkv_norm_rope(q, k, v, None, None, 1e-6, pos, slot, half, False, kc, vc)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_rope_kernel_compiles_for_sm90() -> None:
    """Every launched variant (cache dtype x NEOX x HAS_NORM, D = 64/128, rot < D, bf16 input,
    q8_0/q4_0 pools) compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_qkv_norm_rope_kernel") == 20, out
    print(out)

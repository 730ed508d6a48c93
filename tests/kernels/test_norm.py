"""kiln.kernels.norm (rms_norm, add_rms_norm, qk_norm) against kiln.ops.reference.

On the CPU this runs through Triton's interpreter (tests/kernels/conftest.py) on small shapes; on
a GPU the same cases add real ones (n_embd up to 8192, T = 512, qwen3 heads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.ops import reference
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import DECODE_FUSIONS

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-6
ACTS = (torch.float32, torch.float16, torch.bfloat16)
_ids = {"ids": lambda d: str(d).removeprefix("torch.")}

# Row sizes: odd, non-power-of-two (smollm2's 576), power of two; real n_embd on a GPU.
NS = (33, 576, 64) + ((1024, 2048, 4096, 5120, 8192) if CUDA else ())
TS = (1, 3) + ((512,) if CUDA else ())
# (T, H, Hkv, D): non-power-of-two D and T = 3 here; qwen3's heads on a GPU.
HEADS = [(1, 4, 2, 128), (3, 4, 2, 64), (3, 3, 1, 48)]
if CUDA:
    HEADS += [(1, 16, 8, 128), (1, 32, 8, 128), (1, 64, 4, 128), (512, 32, 8, 128)]


def _kernels():
    from kiln.kernels import norm

    if not CUDA and not norm._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return norm


def _weight(values: torch.Tensor, qtype: str = "F32") -> Weight:
    """A 1-D GGUF norm weight on DEVICE (F32: its bytes are the values)."""
    t = GGMLQuantizationType[qtype]
    raw = quant.quantize(values.float().reshape(1, -1), t).reshape(-1)
    return Weight(f"norm_{qtype}", t, (values.numel(),), raw.to(DEVICE))


def _norm_weight(n: int, gen: torch.Generator, qtype: str = "F32") -> Weight:
    return _weight(1.0 + 0.2 * torch.randn(n, generator=gen), qtype)


def _inputs(t: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """x of [T, n] in several layouts: contiguous, a column slice of a merged [T, 3n] result
    (row stride 3n), 3-D, 1-D."""
    merged = (3 * torch.randn(t, 3 * n, generator=gen)).to(dtype).to(DEVICE)
    return {
        "2d": (3 * torch.randn(t, n, generator=gen)).to(dtype).to(DEVICE),
        "view": merged[:, n : 2 * n],
        "3d": torch.randn(2, t, n, generator=gen).to(dtype).to(DEVICE),
        "1d": torch.randn(n, generator=gen).to(dtype).to(DEVICE),
    }


def _rel_check(y: torch.Tensor, ref: torch.Tensor, key: str, what: str) -> None:
    rtol, atol, _reason = DECODE_FUSIONS[key]
    _check(y, ref, atol + rtol * ref.abs(), what)


@pytest.mark.parametrize("act", ACTS, **_ids)
def test_rms_norm_matches_reference(act: torch.dtype) -> None:
    norm = _kernels()
    gen = torch.Generator().manual_seed(11)
    for n in NS:
        w = _norm_weight(n, gen)
        for t in TS:
            for layout, x in _inputs(t, n, act, gen).items():
                y = norm.rms_norm(x, w, EPS)
                assert y.shape == x.shape
                ref = reference.rms_norm(x, w, EPS)
                _rel_check(y, ref, "rms_norm", f"rms_norm x:{act} {layout} {tuple(x.shape)}")


def test_rms_norm_dequantizes_other_weight_types() -> None:
    """A norm weight stored as F16 (not the usual F32) goes through Weight.dense()."""
    norm = _kernels()
    gen = torch.Generator().manual_seed(12)
    w = _norm_weight(96, gen, "F16")
    x = torch.randn(3, 96, generator=gen).to(DEVICE)
    _rel_check(norm.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS), "rms_norm", "F16 weight")


@pytest.mark.parametrize("act", ACTS, **_ids)
def test_add_rms_norm_matches_reference(act: torch.dtype) -> None:
    """x (the block output, any float dtype, maybe a strided view) + the f32 residual stream."""
    norm = _kernels()
    gen = torch.Generator().manual_seed(13)
    for n in NS:
        w = _norm_weight(n, gen)
        for t in TS:
            for layout, x in _inputs(t, n, act, gen).items():
                r = (4 * torch.randn(x.shape, generator=gen)).to(DEVICE)
                h, y = norm.add_rms_norm(x, r, w, EPS)
                h_ref, y_ref = reference.add_rms_norm(x.float(), r, w, EPS)
                what = f"add_rms_norm x:{act} {layout} {tuple(x.shape)}"
                _rel_check(h, h_ref, "add_rms_norm.h", what + " h")
                _rel_check(y, y_ref, "add_rms_norm", what)
                # The fusion and its decomposition (add, then the rms_norm kernel) round alike for
                # the f32 block outputs the model passes; for f16/bf16 x the H100 build differs
                # from the unfused one by an ulp (seen on an H100), within the tolerance.
                unfused = norm.rms_norm(h, w, EPS)
                if act == torch.float32:
                    assert torch.equal(y, unfused), what + ": fused != add + rms_norm"
                else:
                    _rel_check(y, unfused, "add_rms_norm", what + " vs add + rms_norm")


def _merged_qkv(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """q [T, H, D], k [T, Hkv, D]: views of one merged QKV result [T, (H + 2 Hkv) D]."""
    qkv = (2 * torch.randn(t, (h + 2 * hkv) * d, generator=gen)).to(dtype).to(DEVICE)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    return q, k


@pytest.mark.parametrize("act", (torch.float32, torch.bfloat16), **_ids)
def test_qk_norm_matches_reference(act: torch.dtype) -> None:
    norm = _kernels()
    gen = torch.Generator().manual_seed(14)
    for t, h, hkv, d in HEADS:
        q, k = _merged_qkv(t, h, hkv, d, act, gen)
        qw, kw = _norm_weight(d, gen), _norm_weight(d, gen)
        q_out, k_out = norm.qk_norm(q, k, qw, kw, EPS)
        q_ref, k_ref = reference.qk_norm(q, k, qw, kw, EPS)
        what = f"qk_norm {act} T={t} H={h} Hkv={hkv} D={d}"
        _rel_check(q_out, q_ref, "qk_norm", what + " q")
        _rel_check(k_out, k_ref, "qk_norm", what + " k")
        assert q_out.is_contiguous() and k_out.is_contiguous()
        # Same per-row arithmetic as the rms_norm kernel on each head row: bitwise equal.
        assert torch.equal(q_out, norm.rms_norm(q, qw, EPS)), what + ": qk_norm q != rms_norm"
        assert torch.equal(k_out, norm.rms_norm(k, kw, EPS)), what + ": qk_norm k != rms_norm"


# (input scale, eps) where eps decides the result, unlike eps 1e-6 on rows of mean square 1-9:
# rows of mean square ~1e-6 with eps 1e-6 (eps moves the scale by ~1/sqrt(2)), unit rows with
# eps 1e-2 (0.5%), and all-zero rows (0 * rsqrt(0 + eps) = 0; without eps 0 * inf = NaN).
EPS_CASES = [(1e-3, 1e-6), (1.0, 1e-2), (0.0, 1e-5)]


def _eps_ignored(ref_with_eps: torch.Tensor, ref_without_eps: torch.Tensor, key: str) -> bool:
    """Whether the reference without eps passes as the reference with it: if so, a case could
    not catch a kernel that drops eps."""
    rtol, atol, _ = DECODE_FUSIONS[key]
    err = (ref_without_eps - ref_with_eps).abs()
    return bool((err <= atol + rtol * ref_with_eps.abs()).all())


@pytest.mark.parametrize(("scale", "eps"), EPS_CASES, ids=("small_x", "large_eps", "zero_rows"))
def test_norms_where_eps_matters(scale: float, eps: float) -> None:
    """rms_norm, add_rms_norm and qk_norm (the RMSNorm they share) on inputs where eps is a
    large part of the mean square."""
    norm = _kernels()
    gen = torch.Generator().manual_seed(16)
    n, t, (h, hkv, d) = 96, 3, (4, 2, 64)
    w = _norm_weight(n, gen)
    x = (scale * torch.randn(t, n, generator=gen)).to(DEVICE)
    ref = reference.rms_norm(x, w, eps)
    assert torch.isfinite(ref).all()
    assert scale == 0.0 or not _eps_ignored(ref, reference.rms_norm(x, w, 0.0), "rms_norm")
    what = f"x scale {scale} eps {eps}"
    _rel_check(norm.rms_norm(x, w, eps), ref, "rms_norm", "rms_norm " + what)

    r = (scale * torch.randn(t, n, generator=gen)).to(DEVICE)
    hsum, y = norm.add_rms_norm(x, r, w, eps)
    h_ref, y_ref = reference.add_rms_norm(x, r, w, eps)
    _rel_check(hsum, h_ref, "add_rms_norm.h", "add_rms_norm h " + what)
    _rel_check(y, y_ref, "add_rms_norm", "add_rms_norm " + what)

    qkv = (scale * torch.randn(t, (h + 2 * hkv) * d, generator=gen)).to(DEVICE)
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    qw, kw = _norm_weight(d, gen), _norm_weight(d, gen)
    q_out, k_out = norm.qk_norm(q, k, qw, kw, eps)
    q_ref, k_ref = reference.qk_norm(q, k, qw, kw, eps)
    _rel_check(q_out, q_ref, "qk_norm", "qk_norm q " + what)
    _rel_check(k_out, k_ref, "qk_norm", "qk_norm k " + what)


def test_norm_rejects_bad_input() -> None:
    norm = _kernels()
    gen = torch.Generator().manual_seed(15)
    w = _norm_weight(64, gen)
    with pytest.raises(AssertionError, match="64 values, x 32"):
        norm.rms_norm(torch.zeros(2, 32, device=DEVICE), w, EPS)
    with pytest.raises(AssertionError, match="contiguous last dim"):
        norm.rms_norm(torch.zeros(64, 2, device=DEVICE).T, w, EPS)
    with pytest.raises(AssertionError, match="residual"):
        x, r = torch.zeros(2, 64, device=DEVICE), torch.zeros(3, 64, device=DEVICE)
        norm.add_rms_norm(x, r, w, EPS)
    q = torch.zeros(1, 4, 2, 64, device=DEVICE)[:, :, 0]  # head stride 128, not D = 64
    with pytest.raises(AssertionError, match="heads must be packed"):
        norm.qk_norm(q, torch.zeros(1, 2, 64, device=DEVICE), w, w, EPS)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from gguf.constants import GGMLQuantizationType
from kiln.kernels import norm
from kiln.weight import Weight
from tests.kernels.sm90 import compile_only

def w(n):
    return Weight("w", GGMLQuantizationType.F32, (n,), torch.ones(n).view(torch.uint8))

with compile_only() as done:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        norm.rms_norm(torch.zeros(1, 4096, dtype=dt), w(4096), 1e-6)
    norm.rms_norm(torch.zeros(7, 576), w(576), 1e-6)  # smollm2: masked row
    norm.rms_norm(torch.zeros(1, 8192), w(8192), 1e-6)  # the largest n_embd: 16 warps
    norm.add_rms_norm(torch.zeros(1, 4096), torch.zeros(1, 4096), w(4096), 1e-6)
    norm.add_rms_norm(torch.zeros(3, 576), torch.zeros(3, 576), w(576), 1e-6)
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.zeros(1, (32 + 2 * 8) * 128, dtype=dt)
        q, k = qkv[:, :4096].view(1, 32, 128), qkv[:, 4096:5120].view(1, 8, 128)
        norm.qk_norm(q, k, w(128), w(128), 1e-6)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_norm_kernels_compile_for_sm90() -> None:
    """Every launched variant compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_rms_norm_kernel") == 5, out
    assert names.count("_add_rms_norm_kernel") == 2, out
    assert names.count("_qk_norm_kernel") == 2, out
    print(out)

"""Float, legacy, IQ4 and MXFP4 formats against gguf.quants (numpy), compared bitwise.

Dequantize is checked on uniform random bytes (where f16 scales can be inf/NaN, so NaN matches
any NaN) and on blocks with finite scales (every bit must match). Quantize is checked on rows
built to hit the edge cases of each reference quantizer: zero, constant, outlier, negative-only,
tiny and subnormal blocks, and exact rounding ties.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, QK_K
from gguf.constants import GGMLQuantizationType as T

import kiln.quant as kq
from kiln.errors import UnsupportedError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

FLOATS = [T.F32, T.F16, T.BF16]
DEQUANT_TYPES = [*FLOATS, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS, T.MXFP4]
QUANT_TYPES = [*FLOATS, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4]

# Byte offsets of the f16 fields (scales, mins) inside one block.
F16_FIELDS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}

# Round trip: max |x - dequant(quant(x))| per block, as a fraction of the block's max |x|.
# Q4_0/Q5_0 clip the side opposite the max (7/8 and 15/16 of it); MXFP4 tops out at 1.5 * 2**E.
ROUND_TRIP_TOL = {
    T.F32: 0.0,
    T.F16: 2.0**-11,
    T.BF16: 2.0**-8,
    T.Q8_0: 0.5 / 127 + 2.0**-10,
    T.Q4_0: 1 / 8 + 2.0**-8,
    T.Q4_1: 0.5 / 15 * 2 + 2.0**-8,  # of the range, which is at most 2 * max |x|
    T.Q5_0: 1 / 16 + 2.0**-8,
    T.Q5_1: 0.5 / 31 * 2 + 2.0**-8,
    T.MXFP4: 0.25 + 2.0**-8,
}


# ---- comparison helpers ----


def _ref_dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gq.dequantize(raw, qtype).astype(np.float32, copy=False)


def _ref_quantize(x: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = gq.quantize(x, qtype)
    return np.ascontiguousarray(out).view(np.uint8).reshape(*x.shape[:-1], -1)


def assert_float_bits_equal(actual: torch.Tensor, expected: np.ndarray, *, nan_aware: bool) -> None:
    """Bitwise float32 equality; with nan_aware, a NaN matches any NaN (payloads may differ)."""
    a = actual.detach().cpu().to(torch.float32).contiguous().numpy()
    e = np.ascontiguousarray(expected, dtype=np.float32)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    bad = a.view(np.uint32) != e.view(np.uint32)
    if nan_aware:
        bad &= ~(np.isnan(a) & np.isnan(e))
    n_bad = int(bad.sum())
    if n_bad:
        diff = np.where(bad, np.abs(a.astype(np.float64) - e.astype(np.float64)), -1.0)
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = np.unravel_index(int(np.argmax(diff)), a.shape)
        raise AssertionError(
            f"{n_bad} of {a.size} values differ; worst at {tuple(int(i) for i in worst)}: "
            f"got {a[worst]!r} (0x{a.view(np.uint32)[worst]:08x}), "
            f"expected {e[worst]!r} (0x{e.view(np.uint32)[worst]:08x}); "
            f"NaN got/expected {int(np.isnan(a).sum())}/{int(np.isnan(e).sum())}, "
            f"inf got/expected {int(np.isinf(a).sum())}/{int(np.isinf(e).sum())}"
        )


def assert_bytes_equal(actual: torch.Tensor, expected: np.ndarray, block_bytes: int) -> None:
    a = actual.detach().cpu().contiguous().numpy()
    assert a.dtype == np.uint8, a.dtype
    assert a.shape == expected.shape, f"shape {a.shape} != expected {expected.shape}"
    bad = a != expected
    n_bad = int(bad.sum())
    if n_bad:
        flat = np.flatnonzero(bad.reshape(-1))
        first = int(flat[0])
        blk, off = divmod(first, block_bytes)
        raise AssertionError(
            f"{n_bad} of {a.size} bytes differ in {len(np.unique(flat // block_bytes))} blocks; "
            f"first at block {blk} byte {off}: got {a.reshape(-1)[first]}, "
            f"expected {expected.reshape(-1)[first]}; block got "
            f"{a.reshape(-1, block_bytes)[blk].tolist()} expected "
            f"{expected.reshape(-1, block_bytes)[blk].tolist()}"
        )


# ---- inputs ----


def _random_raw(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 values over the whole range: normals of every exponent, subnormals, zeros."""
    bits = rng.integers(0, 0x7C00, size=n, dtype=np.uint16)  # every finite positive pattern
    bits |= rng.integers(0, 2, size=n, dtype=np.uint16) << 15
    bits[:4] = [0x0000, 0x8000, 0x7BFF, 0x0001]
    return bits.view(np.float16)


def _finite_raw(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random blocks whose f16 fields are finite (float formats: finite values)."""
    if qtype == T.F32:
        x = rng.standard_normal(n_blocks) * np.exp(rng.uniform(-80, 80, n_blocks))
        return x.astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    if qtype in (T.F16, T.BF16):
        h = _finite_f16(rng, n_blocks)
        if qtype == T.F16:
            return h.view(np.uint8).reshape(n_blocks, 2)
        bits = rng.integers(0, 0x7F80, size=n_blocks, dtype=np.uint16)
        bits |= rng.integers(0, 2, size=n_blocks, dtype=np.uint16) << 15
        return bits.view(np.uint8).reshape(n_blocks, 2)
    raw = _random_raw(rng, qtype, n_blocks)
    for off in F16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = _finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def _special_blocks(rng: np.random.Generator, bs: int = 32) -> np.ndarray:
    """float32 [M, bs]: blocks that exercise every branch and tie of the reference quantizers."""
    g = rng.standard_normal
    blocks = []
    # Gaussian blocks over a wide range of scales (no f16 overflow of the scales for most).
    scales = np.exp(rng.uniform(-30, 12, size=(64, 1)))
    blocks.append(g((64, bs)) * scales)
    blocks.append(np.zeros((2, bs)))  # all zero (d = 0, id = 0)
    blocks.append(np.full((2, bs), 1.5))  # constant positive
    blocks.append(np.full((2, bs), -0.375))  # constant negative
    outlier = g((4, bs))
    outlier[np.arange(4), rng.integers(0, bs, 4)] = [1e4, -1e4, 3e2, -65.0]
    blocks.append(outlier)  # one big outlier
    blocks.append(-np.abs(g((4, bs))) * 3)  # negative only
    blocks.append(np.abs(g((4, bs))) * 0.01)  # positive only
    blocks.append(g((4, bs)) * np.array([[1e-30], [1e-36], [1e-38], [1e-42]]))  # tiny, subnormal
    blocks.append(g((2, bs)) * np.array([[1e30], [1e8]]))  # huge: f16 scales overflow to inf
    # Equal magnitudes of both signs: argmax must take the first.
    tie = g((2, bs))
    tie[0, [3, 7]] = [5.0, -5.0]
    tie[1, [3, 7]] = [-5.0, 5.0]
    blocks.append(tie)
    # Exact rounding ties: with max |x| = 127 (Q8_0 d = 1) or a max of -8 / -16 (Q4_0 / Q5_0
    # d = 1), or min 0 and max 15 / 31 (Q4_1 / Q5_1 d = 1), x * id lands on k + 0.5.
    halves = rng.integers(-40, 40, size=(8, bs)) + 0.5
    for i, (lo, hi) in enumerate([(-127, 127), (-8, 7), (-16, 15), (0, 15), (0, 31)]):
        blk = np.clip(halves[i], lo, hi)
        blk[0] = lo if lo else hi
        blk[1] = hi if lo else 0.0
        blocks.append(blk[None])
    blocks.append(np.clip(halves[5:], -6, 6) * 0.25)  # MXFP4 grid midpoints
    # Values just around the ties: one ulp either side.
    near = np.clip(halves[:2], -127, 127).astype(np.float32)
    near[:, 0] = 127
    blocks.append(np.nextafter(near, np.float32(np.inf)))
    blocks.append(np.nextafter(near, np.float32(-np.inf)))
    blocks.append(rng.integers(-3, 4, size=(2, bs)).astype(np.float64))  # small integers
    blocks.append(-np.abs(g((1, bs))) * (rng.random((1, bs)) < 0.5))  # negatives and -0
    return np.concatenate(blocks, axis=0).astype(np.float32)


# ---- dequantize ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: T, device: str) -> None:
    rng = np.random.default_rng(1000 + int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 4096 if block_size == 1 else 1024
    raw = _random_raw(rng, qtype, n_blocks)
    expected = _ref_dequantize(raw, qtype).reshape(n_blocks, block_size)
    got = kq.get_format(qtype).dequantize_blocks(torch.from_numpy(raw).to(device))
    assert got.dtype == torch.float32
    # Float formats keep NaN payloads exactly; scaled formats only promise "a NaN".
    assert_float_bits_equal(got, expected, nan_aware=qtype not in FLOATS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_finite_scales(qtype: T, device: str) -> None:
    rng = np.random.default_rng(2000 + int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 4096 if block_size == 1 else 1024
    raw = _finite_raw(rng, qtype, n_blocks)
    expected = _ref_dequantize(raw, qtype).reshape(n_blocks, block_size)
    got = kq.get_format(qtype).dequantize_blocks(torch.from_numpy(raw).to(device))
    assert_float_bits_equal(got, expected, nan_aware=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_dequantize_half_exhaustive(qtype: T, device: str) -> None:
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(-1, 2)
    expected = _ref_dequantize(raw, qtype).reshape(-1, 1)
    got = kq.get_format(qtype).dequantize_blocks(torch.from_numpy(raw).to(device))
    assert_float_bits_equal(got, expected, nan_aware=False)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_mxfp4_every_exponent(device: str) -> None:
    raw = np.zeros((256, 17), dtype=np.uint8)
    raw[:, 0] = np.arange(256)
    raw[:, 1:] = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)[np.arange(256) % 16]
    got = kq.get_format(T.MXFP4).dequantize_blocks(torch.from_numpy(raw).to(device))
    assert_float_bits_equal(got, _ref_dequantize(raw, T.MXFP4).reshape(256, 32), nan_aware=False)


# ---- quantize ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_special_rows(qtype: T, device: str) -> None:
    rng = np.random.default_rng(3000 + int(qtype))
    x = _special_blocks(rng)  # one block per row
    expected = _ref_quantize(x, qtype)
    got = kq.quantize(torch.from_numpy(x).to(device), qtype)
    assert_bytes_equal(got, expected, GGML_QUANT_SIZES[qtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_random_rows(qtype: T, device: str) -> None:
    rng = np.random.default_rng(4000 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = rng.standard_normal((64, 512)) * np.exp(rng.uniform(-8, 8, size=(64, 1)))
    rows *= np.exp(rng.uniform(-2, 2, size=(64, 512 // 32, 1))).repeat(32, axis=-1).reshape(64, 512)
    x = rows.astype(np.float32)
    expected = _ref_quantize(x, qtype)
    got = kq.quantize(torch.from_numpy(x).to(device), qtype)
    assert_bytes_equal(got, expected, type_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_mixed_signed_zeros(qtype: T, device: str) -> None:
    rng = np.random.default_rng(4500 + int(qtype))
    x = np.where(rng.random((16, 64)) < 0.5, -0.0, 0.0).astype(np.float32)
    x[8:] += np.where(rng.random((8, 64)) < 0.5, 1.0, 0.0).astype(np.float32)  # min is +-0
    expected = _ref_quantize(x, qtype)
    got = kq.quantize(torch.from_numpy(x).to(device), qtype).cpu().numpy()
    if qtype in (T.Q4_1, T.Q5_1):
        # The min of a block holding both +0 and -0 is either zero: numpy's SIMD reduction picks
        # one depending on position (llama.cpp's C loop keeps the first). Only m's sign bit (the
        # high byte of the f16 at offset 2) may differ; it decodes to the same values.
        _, type_size = GGML_QUANT_SIZES[qtype]
        sign = np.zeros(type_size, dtype=np.uint8)
        sign[3] = 0x80
        sign = np.tile(sign, x.shape[-1] // 32)
        expected, got = expected & ~sign, got & ~sign
    assert_bytes_equal(torch.from_numpy(got), expected, GGML_QUANT_SIZES[qtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_nonfinite(qtype: T, device: str) -> None:
    # Degenerate input (inf, NaN) still gives gguf's bytes, so a bad tensor fails the same way.
    rng = np.random.default_rng(5000 + int(qtype))
    x = rng.standard_normal((6, 64)).astype(np.float32)
    x[0, 5] = np.inf
    x[1, 40] = -np.inf
    x[2, 7] = np.nan
    x[3, :] = np.nan
    x[4, 33] = np.float32(np.uint32(0x7F800001).view(np.float32))  # signalling NaN payload
    x[5, [1, 35]] = [np.inf, -np.inf]
    expected = _ref_quantize(x, qtype)
    got = kq.quantize(torch.from_numpy(x).to(device), qtype).cpu().numpy()
    # A scale computed from NaN is NaN, but which NaN is the hardware's choice (x86 gives
    # 0xffc00000 or the input's payload, CUDA 0x7fffffff): any f16 NaN matches any NaN there.
    _, type_size = GGML_QUANT_SIZES[qtype]
    for off in F16_FIELDS.get(qtype, ()):
        g = got.reshape(-1, type_size)[:, off : off + 2]
        e = expected.reshape(-1, type_size)[:, off : off + 2]
        both = _is_f16_nan(g) & _is_f16_nan(e)
        g[both] = e[both]
    assert_bytes_equal(torch.from_numpy(got), expected, type_size)


def _is_f16_nan(fields: np.ndarray) -> np.ndarray:
    """fields: uint8 [B, 2] little-endian f16 -> bool [B]."""
    h = fields[:, 0].astype(np.uint16) | (fields[:, 1].astype(np.uint16) << 8)
    return (h & 0x7FFF) > 0x7C00


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_quantize_half_random_bits(qtype: T, device: str) -> None:
    # Every class of float32 bit pattern: normals, subnormals, inf, NaN with any payload, and
    # values just around the rounding midpoints of the 16-bit format.
    rng = np.random.default_rng(6000 + int(qtype))
    bits = rng.integers(0, 1 << 32, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    shift = 13 if qtype == T.F16 else 16
    mid = (rng.integers(0, 1 << 16, size=1 << 14, dtype=np.uint32) << shift) | (1 << (shift - 1))
    bits = np.concatenate([bits, mid, mid - 1, mid + 1, mid ^ (1 << shift)])
    x = bits.view(np.float32).reshape(-1, 16)
    if qtype == T.F16:  # also the f16 subnormal and overflow range, more densely
        x = np.concatenate([x, (rng.standard_normal((256, 16)) * 2.0**-20).astype(np.float32)])
        x = np.concatenate([x, np.linspace(65000, 66000, 512, dtype=np.float32).reshape(-1, 16)])
    expected = _ref_quantize(x, qtype)
    got = kq.quantize(torch.from_numpy(x).to(device), qtype)
    assert_bytes_equal(got, expected, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_round_trip_error_bounded(qtype: T, device: str) -> None:
    rng = np.random.default_rng(7000 + int(qtype))
    x = rng.standard_normal((32, 256)) * np.exp(rng.uniform(-6, 6, size=(32, 1)))
    x = torch.from_numpy(x.astype(np.float32)).to(device)
    y = kq.dequantize(kq.quantize(x, qtype), qtype, x.shape[-1])
    assert y.shape == x.shape and y.dtype == torch.float32
    if qtype in FLOATS:
        bound = ROUND_TRIP_TOL[qtype] * x.abs() + (2.0**-25 if qtype == T.F16 else 0.0)
    else:
        bound = ROUND_TRIP_TOL[qtype] * x.reshape(-1, 32).abs().amax(-1, keepdim=True)
        bound = bound.expand(-1, 32).reshape(x.shape)
    err = (y - x).abs()
    excess = err - bound
    assert torch.isfinite(y).all()
    worst = int(excess.reshape(-1).argmax())
    assert excess.max() <= 0, (
        f"{int((excess > 0).sum())} values beyond the bound; worst at {worst}: "
        f"x={x.reshape(-1)[worst].item()!r} y={y.reshape(-1)[worst].item()!r} "
        f"bound={bound.reshape(-1)[worst].item()!r}"
    )


# ---- the row API ----


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_rows_shapes(qtype: T) -> None:
    rng = np.random.default_rng(8000 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = 2 * max(block_size, 32)
    row_bytes = n // block_size * type_size
    raw = _finite_raw(rng, qtype, 3 * 5 * (n // block_size)).reshape(3, 5, row_bytes)
    expected = _ref_dequantize(raw.reshape(15, row_bytes), qtype).reshape(3, 5, n)

    got = kq.dequantize(torch.from_numpy(raw), qtype, n)
    assert got.shape == (3, 5, n)
    assert_float_bits_equal(got, expected, nan_aware=False)

    flat = kq.dequantize(torch.from_numpy(raw.reshape(-1)), qtype, n)  # 1-D raw: [rows, n]
    assert flat.shape == (15, n)
    assert_float_bits_equal(flat, expected.reshape(15, n), nan_aware=False)

    # A strided view into a wider buffer (rows of a bigger mmap) dequantizes the same.
    wide = np.zeros((15, row_bytes + 7), dtype=np.uint8)
    wide[:, 3 : 3 + row_bytes] = raw.reshape(15, row_bytes)
    view = torch.from_numpy(wide)[:, 3 : 3 + row_bytes]
    assert not view.is_contiguous()
    assert_float_bits_equal(kq.dequantize(view, qtype, n), expected.reshape(15, n), nan_aware=False)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_rows_shapes(qtype: T) -> None:
    rng = np.random.default_rng(9000 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = 3 * max(block_size, 32)
    x = rng.standard_normal((2, 3, n)).astype(np.float32)
    expected = _ref_quantize(x.reshape(6, n), qtype).reshape(2, 3, -1)
    got = kq.quantize(torch.from_numpy(x), qtype)
    assert got.shape == (2, 3, n // block_size * type_size)
    assert_bytes_equal(got, expected, type_size)
    # Other input dtypes are converted to float32 first; a transposed input works too.
    got16 = kq.quantize(torch.from_numpy(x).to(torch.float16), qtype)
    exp16 = _ref_quantize(x.astype(np.float16).astype(np.float32), qtype).reshape(2, 3, -1)
    assert_bytes_equal(got16, exp16, type_size)
    xt = torch.from_numpy(np.ascontiguousarray(x.reshape(6, n).T)).T
    assert_bytes_equal(kq.quantize(xt, qtype), expected.reshape(6, -1), type_size)


@pytest.mark.parametrize(
    "qtype", [t for t in DEQUANT_TYPES if t not in FLOATS], ids=lambda t: t.name
)
def test_bad_row_length_raises(qtype: T) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = block_size + 1 if block_size == 32 else QK_K // 2
    with pytest.raises(UnsupportedError, match=str(block_size)):
        kq.dequantize(torch.zeros(4 * type_size, dtype=torch.uint8), qtype, n)
    with pytest.raises(UnsupportedError):
        kq.quantize(torch.zeros(2, n), qtype)
    # A byte count that is no whole number of rows.
    with pytest.raises(UnsupportedError):
        kq.dequantize(torch.zeros(type_size + 1, dtype=torch.uint8), qtype, block_size)


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_read_only_formats_refuse_quantize(qtype: T) -> None:
    with pytest.raises(UnsupportedError, match="only read"):
        kq.quantize(torch.zeros(1, GGML_QUANT_SIZES[qtype][0]), qtype)


def test_formats_registered() -> None:
    for qtype in DEQUANT_TYPES:
        fmt = kq.get_format(qtype)
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]
        assert (fmt.quantize_blocks is not None) == (qtype in QUANT_TYPES), qtype.name
    assert kq.get_format("q4_0").qtype == T.Q4_0
    assert kq.get_format(int(T.MXFP4)).qtype == T.MXFP4

"""K-quants (Q2_K..Q6_K): dequantize bit-exact against gguf.quants, quantize as llama.cpp.

Dequantize is compared bitwise with gguf's numpy reference on uniform random bytes (inf/NaN f16
scales included: a NaN matches any NaN) and on blocks with finite scales (every bit must match).

Quantize (Q4_K, Q5_K, Q6_K) follows llama.cpp's reference quantizers. gguf has none to compare
with, so: blocks of GOLDEN_INPUT must give exactly llama-quantize's bytes (per-block CRC32s below,
made by `python scripts/kquant_rmse.py --golden`), and on random data the round-trip error stays
under the bounds measured here, orders the types Q6_K < Q5_K < Q4_K, and edge-case blocks (zero,
constant, outliers, one-signed, tiny, large) give finite values close to the input.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

import kiln.quant as kq

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QUANT_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
TYPE_SIZES = {T.Q2_K: 84, T.Q3_K: 110, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}
# Byte offsets of the f16 fields (d, dmin) inside one block.
F16_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}

# Round trip on N(0, 1) data: RMSE of dequant(quant(x)) - x over the RMS of x. Measured on
# 512 blocks (seed 7): Q4_K 0.0713, Q5_K 0.0360, Q6_K 0.0177; bounds leave about 5% room.
RMSE_BOUND = {T.Q4_K: 0.075, T.Q5_K: 0.038, T.Q6_K: 0.0186}


# ---- helpers ----


def _ref_dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(gq.dequantize(raw, qtype), dtype=np.float32).reshape(raw.shape[0], -1)


def _assert_bits_equal(got: torch.Tensor, want: np.ndarray, *, nan_aware: bool) -> None:
    a = got.detach().cpu().contiguous().numpy()
    assert a.dtype == np.float32 and a.shape == want.shape, (a.dtype, a.shape, want.shape)
    bad = a.view(np.int32) != want.view(np.int32)
    if nan_aware:
        bad &= ~(np.isnan(a) & np.isnan(want))
    n_bad = int(bad.sum())
    if n_bad:
        diff = np.abs(a.astype(np.float64) - want.astype(np.float64))
        diff = np.where(bad, np.nan_to_num(diff, nan=np.inf), -1.0)
        worst = np.unravel_index(int(np.argmax(diff)), a.shape)
        raise AssertionError(
            f"{n_bad} of {a.size} values differ; worst at {tuple(int(i) for i in worst)}: "
            f"got {a[worst]!r} (0x{a.view(np.uint32)[worst]:08x}), want {want[worst]!r} "
            f"(0x{want.view(np.uint32)[worst]:08x}); NaN got/want "
            f"{int(np.isnan(a).sum())}/{int(np.isnan(want).sum())}"
        )


def _rel_rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())


def _round_trip(x: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = kq.get_format(qtype)
    q = fmt.quantize_blocks(x)
    assert q.dtype == torch.uint8 and q.shape == (x.shape[0], TYPE_SIZES[qtype]), q.shape
    return q, fmt.dequantize_blocks(q)


def _finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 bit patterns of every exponent, subnormals and both zeros included."""
    bits = rng.integers(0, 0x7C00, size=n, dtype=np.uint16)
    bits |= rng.integers(0, 2, size=n, dtype=np.uint16) << 15
    special = [0x0000, 0x8000, 0x7BFF, 0x0001]
    bits[: len(special)] = special[:n]
    return bits.view(np.uint8).reshape(n, 2)


# ---- golden input: llama-quantize's bytes for it are pinned below ----


def _splitmix64(n: int, seed: int) -> np.ndarray:
    x = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# Six 256-value blocks of SmolLM2-135M-Instruct's ffn_down weights, as the Q4_1 blocks they are
# stored in (8 x 20 B: d f16, m f16, 16 B of nibbles; x = d * q + m). Picked because they are
# sensitive to float32 details of llama.cpp's code: the first two quantize differently to Q4_K or
# Q5_K when 63/max_scale or 63/max_min is computed as a reciprocal-multiply, the next two to Q6_K
# with all divisions done so, the last two to Q5_K with torch's float32 sqrt (not correctly
# rounded on CPU).
REAL_Q4_1_BLOCKS = (
    (
        "af2bf8b58666f864685762587666505585336664c228d8b5bea3487699cabbd5b0ceee85fa7828cd"
        "5728a0b46638789cb514463fa9e7d0c572e19b95bc2a70b7690bc6c7d87ea89887ab7ad76caaaefc"
        "af2708b257a8187514b58ab8ba8307b8d4fe6567772920b4479448f97a659a57b947308244736706"
        "6629a8b499c3686e3b553bb7b7c73cfa05564189152990b4e6e770ba6988f4595a5438a553d08e65"
    ),
    (
        "0b2cd8b7bad65309fd754c697be6f7cad58ab65ac92bd8b6c85655bb9a74fc6b977689b06e9bcfb8"
        "402ce8b8235b87c7cda88ff780cbbc4e4b518157fc2b50b7b97a49774b8fb3d703dc1084a16497e3"
        "9e2cd0b89dcf9803d979c1663bc1c47d61e83e6ca22c00b865b7af75a573c05b37865d96767727a5"
        "622fd8ba989974b8555a956f95a9689094777867cd2c40ba3a7cbe7ce2bc6d9d99daf3cadbe0a9db"
    ),
    (
        "0d2cb8b8bdda06567f9a87abb7d7797c6d6b70bbe92818b3408733256787e29ff65ee6cc5d6d6aa1"
        "002cb0b7607cb6449238a5746ce0c487cfb92ec95c2cf8b7a4617afb79a31a082896d7be58685165"
        "a22858b5d01ffc6933a78466c95e0bcabdf8e89afc2b70b73f93ab40c787d44ba0562229ba2a1a57"
        "262ab0b692cd5c8a5273d9ca4df35cc747fc0464cd2b40b89058a6fd9c8a2b5b7ff6a9789cdb8a75"
    ),
    (
        "bc2cc8b8dba8a78887bb968b69baa787b5ba09f7732c40b79268595f497264055895b77a836a3739"
        "da2a68b7b798d9caf58dd8769687d59395a28820622b00b838a7cc5aabd0de8b7b746fdd8bfa87dc"
        "a62980b4085877876fa66389cb4665e9066940479a2c88b8b0874936396a777a399576995ea56fb6"
        "6f2b98b7abd9660e6c2bf6b5b8ba47968ecb4895662dd0b4254842292f5331825786666611562034"
    ),
    (
        "af2940b5b66bae655a028f94cc977a9b6e67683ae62a88b6087d9ac97a2ca87d6af598657a7858c9"
        "372a20b796c08997f58c874a8469bdb677a7cda9fa2810b66cd7a2da5beca7ce63bb5ecac38c9f04"
        "d52980b470247888b498376b62fd7864373212349a2a98b6c46d7b3529565897887e0a7bb9f83338"
        "da28d8b5ccbc9404ebca986b4c89b9cfacfdd52e5a2c70b70ca84766639797879a8f648975454b69"
    ),
    (
        "002c80b88a2b568ba7098a8fd88d998c859ea667512c00b6a5765155aa778ab4726b779a2f8a0868"
        "402b40b89c85d87f7c6bc9b8b5f67b407a9e8a8d7c2b00b8789bca5efb99899888a0dbb94706ad97"
        "3c2c48b8c6788e4697777b70a69cb46cca41955f2f2bd0b5490493bffc28447625a8948163965270"
        "552c18b8679faa5ba6595d97d9858b5b9476a3805a2a08b649e1f365b7435878b23492a0b65474ea"
    ),
)


def _real_blocks() -> np.ndarray:
    """float32 [6, 256], decoded as gguf's Q4_1 dequantizer does: (d * q) + m."""
    raw = np.frombuffer(bytes.fromhex("".join(REAL_Q4_1_BLOCKS)), dtype=np.uint8).reshape(-1, 20)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([raw[:, 4:] & 0x0F, raw[:, 4:] >> 4], axis=1).astype(np.float32)
    return ((d * q) + m).reshape(6, 256)


def golden_input() -> np.ndarray:
    """float32 [17, 1536] = 102 blocks: 6 of each of 16 synthetic kinds, built from integer
    hashes with exact float operations only (the same on every platform and numpy version),
    then the 6 real blocks of REAL_Q4_1_BLOCKS."""
    n = 96 * 256
    h = _splitmix64(4 * n + 4096, 20261122)
    u16 = (h & np.uint64(0xFFFF)).astype(np.int64)  # uniform integers in [0, 65536)
    # Bell-shaped: sum of 4 uniforms, exact in float32 after the power-of-two scaling.
    bell = (u16[:n] + u16[n : 2 * n] + u16[2 * n : 3 * n] + u16[3 * n : 4 * n] - 131070) / 65536.0
    bell = bell.reshape(96, 256)
    extra = u16[4 * n :]
    blocks = np.empty((96, 256))
    for b in range(96):
        kind, r = divmod(b, 6)
        g = bell[b]
        e = extra[b * 40 : b * 40 + 40]
        if kind == 0:  # bell
            v = g
        elif kind == 1:  # small bell
            v = g * 2.0**-7
        elif kind == 2:  # all negative
            v = -np.abs(g)
        elif kind == 3:  # all positive, away from zero
            v = np.abs(g) + 0.25
        elif kind == 4:  # outliers: a few values 64x larger
            v = g * np.where(np.arange(256) % 53 == r, 64.0, 1.0)
        elif kind == 5:  # sparse: about 90% zeros
            v = g * ((e[np.arange(256) % 40] + np.arange(256) * 7919) % 10 == 0)
        elif kind == 6:  # all zero
            v = np.zeros(256)
        elif kind == 7:  # constant block, either sign
            v = np.full(256, (e[0] - 32768) / 4096.0)
        elif kind == 8:  # constant per 32-value sub-block
            v = np.repeat((e[:8] - 32768) / 8192.0, 32)
        elif kind == 9:  # every other 32-value sub-block zero
            v = g * np.repeat(np.arange(8) % 2 == r % 2, 32)
        elif kind == 10:  # integer grid: rounding ties everywhere
            v = (u16[b * 256 : b * 256 + 256] % 16) - 8.0
        elif kind == 11:  # half-integer grid
            v = ((u16[n + b * 256 : n + b * 256 + 256] % 80) - 40) * 0.5
        elif kind == 12:  # tiny: f16 scales subnormal or zero
            v = g * 2.0 ** (-14 - 6 * r)
        elif kind == 13:  # large
            v = g * 1024.0
        elif kind == 14:  # scales spread over 2^-8..2^7 per 16-value sub-block
            v = g * np.repeat(2.0 ** ((e[:16] % 16) - 8.0), 16)
        else:  # spike: zeros and one value
            v = np.zeros(256)
            v[(e[0] % 256)] = 10.0 if r % 2 else -3.0
        blocks[b] = v
    blocks = np.concatenate([blocks.astype(np.float32), _real_blocks()])
    return blocks.reshape(17, 1536)


def block_crcs(raw: np.ndarray, type_size: int) -> list[int]:
    return [zlib.crc32(bytes(b)) for b in np.asarray(raw, dtype=np.uint8).reshape(-1, type_size)]


# CRC32 of each of the 102 blocks llama-quantize (llama.cpp 0c1e570, --pure) wrote for
# golden_input(), made by `python scripts/kquant_rmse.py --golden`.
GOLDEN_CRC32: dict[T, str] = {
    T.Q4_K: (
        "2f7c9ad6 d973a5d5 c2b60507 7dc68721 0e82efa0 f892ebc8 211bf2d9 d8e18f59 "
        "5ec5ac8f 7910ae03 0fad87b6 38a6ecc3 17d593b0 d9a7d2b7 2ee391b7 ee4daaa3 "
        "dc4c59e8 e7e7b96e 4a30e99a 56d1727d 9f6793f8 9e852988 a22e6305 b6a819a1 "
        "ceb955d1 79c05eb4 8841ea84 9349bd17 785ba337 9832181d fe4c391b 5a777b43 "
        "f9369e30 272a4741 5f7d79bf 98d3c1ff 700a059c 700a059c 700a059c 700a059c "
        "700a059c 700a059c 3560e4c2 ffc66084 3c7301fe b7b112fc 8fccce30 37f65cac "
        "fcc9e723 439e07c0 623ebb1b 98ba894c 05e469c4 224a893e e7ba2747 f04d38e5 "
        "1b65d58b 08397c5b d20a6651 92e924d7 df6bfcdb f2362ffd e7608a08 5942abf1 "
        "5666a0d0 8cd747f3 5fef55f2 6ca369b0 c996b7a3 92911b3d da286fbd a57a1b1d "
        "f63f1bbd b0cfa1e4 38bf1983 0ec43610 bee39c5c f529cd3b 231242f4 fad9b994 "
        "7afa94de 55aee0b9 929740c7 d5f5ba61 2c45983d fb5f4ba0 e87b5c14 561944b3 "
        "8674a954 c1ab5541 b1c75611 a19823e7 39afa5d4 99fa1217 39afa5d4 0f98a24d "
        "211e558a d16576d3 47905641 5430b52e 53cc2b82 27e80939"
    ),
    T.Q5_K: (
        "20a3ac14 60f2b945 cf8644d5 87edc988 99692f51 f158aed0 0df4d75e 2a8f10b5 "
        "a711f89e b842118e d695ecd4 e1671233 cd8ebcee 223c2ee2 abf96d2f c4b9233a "
        "b2b08a5e 7b9a02df e54575cd ce82776a 4e3c1043 86a2d1c9 3b0a357d 87b436a1 "
        "a6500e88 b9cce78a 38118bea 0e4c74e4 f55ff19e a167a93f e700b2c5 08cf13e0 "
        "0e297756 7774964c 8d789207 76da948f 2f505e6f 2f505e6f 2f505e6f 2f505e6f "
        "2f505e6f 2f505e6f a73929d2 e7539b18 56ff4a26 83357e14 2fc9a2f5 65510d49 "
        "dee97a93 829ecff5 887a5e6a 817ff1ec 466a8b98 fc1b2b85 b9391d8d 9e7c0958 "
        "e797baf7 e2c1eda9 4948dcc8 6f3bb940 bf94f22a f5d8a173 6baad960 8d86a6f6 "
        "5100d915 5b988f0c 12376eaa 66ee5078 6993237d 93164504 93e5c6d8 3e47d25f "
        "3861af8a 119dd504 b00a2ee0 5cf37996 dec34484 675e9858 9b412604 06a6c2c0 "
        "683592d1 7f92d256 f5378675 4535c97c 8c0f1d03 0ea9addd fc630d3a 5f4e3063 "
        "61823f79 5d0b5ebd 004f8e88 2abb09dc 988d16c1 a6a168e9 988d16c1 2f4e185c "
        "0dd2e9fb 603c14d6 15186f93 6f7b8483 848ab75d cef1c3b5"
    ),
    T.Q6_K: (
        "1db6262c a0309749 a726914d 10259e64 3514d63c d1ef5d49 6c90670f 21f1dab3 "
        "212e9a92 3e02089c c2645672 25766fb7 ef89c67a 8d294427 692029d4 31ac9e6b "
        "e980260a 8e7936d1 19c7ee68 e17d0ada 8cd4a385 d3652879 823c9ff4 dfbaddbd "
        "4f35b67a 45229ec0 c6644fbc f4c0b7db 81020c49 f4a4d04f 80e94f7b 0ea36cfa "
        "9e735061 99d836f3 f1f545c7 c0038f5d 7edef60b 7edef60b 7edef60b 7edef60b "
        "7edef60b 7edef60b ac0fadc2 61091036 df02e495 fb7aaff7 f45b0684 54c209b0 "
        "c500a119 191e7835 9e584a18 439cc083 8bf772ae b194b5f5 e410ec4a cff16d95 "
        "453c6ec2 d0a10914 6771e856 5e19b7c5 012e90dc f41f28eb 67993f51 7d0cd194 "
        "d56bec5e 858735ca 545fdedd 3247349f 14c61d15 01e9cccd e39f7c89 90ac200c "
        "b7749403 fd791962 0115b551 585e2e11 970e1c33 c0b22e0a 08537f6b 28daa189 "
        "44487c96 6a7eb0e8 80e2e071 0ed47cd5 12f93191 bd59ef40 a429fe33 bbc5818d "
        "f7fc7e32 56962535 222b0533 3e9cdb5f 089e381a df135f7c 089e381a 7fa7349f "
        "09cab7a0 1af3cdfc 30a67ea0 cb86d764 9815bb00 554de08b"
    ),
}


# ---- registry ----


def test_registered_layouts() -> None:
    for qtype in K_TYPES:
        fmt = kq.get_format(qtype)
        assert (fmt.block_size, fmt.type_size) == (256, TYPE_SIZES[qtype])
        assert (fmt.quantize_blocks is not None) == (qtype in QUANT_TYPES), qtype.name


# ---- dequantize ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes(qtype: T, device: str) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    raw = rng.integers(0, 256, size=(2048, TYPE_SIZES[qtype]), dtype=np.uint8)
    got = kq.get_format(qtype).dequantize_blocks(torch.from_numpy(raw).to(device))
    _assert_bits_equal(got, _ref_dequantize(raw, qtype), nan_aware=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_dequantize_finite_scales(qtype: T, device: str) -> None:
    rng = np.random.default_rng(200 + int(qtype))
    raw = rng.integers(0, 256, size=(2048, TYPE_SIZES[qtype]), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = _finite_f16(rng, raw.shape[0])
    want = _ref_dequantize(raw, qtype)
    assert np.isfinite(want).all()
    got = kq.get_format(qtype).dequantize_blocks(torch.from_numpy(raw).to(device))
    _assert_bits_equal(got, want, nan_aware=False)


def test_dequantize_rows_through_registry() -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(3, 2 * 144), dtype=np.uint8)
    raw[:, 0:2] = raw[:, 144:146] = _finite_f16(rng, 3)
    raw[:, 2:4] = raw[:, 146:148] = _finite_f16(rng, 3)
    got = kq.dequantize(torch.from_numpy(raw), "q4_k", 512)
    assert got.shape == (3, 512)
    _assert_bits_equal(got, _ref_dequantize(raw, T.Q4_K).reshape(3, 512), nan_aware=False)


# ---- quantize: exactly llama.cpp ----


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_matches_llama_cpp(qtype: T) -> None:
    want = [int(h, 16) for h in GOLDEN_CRC32[qtype].split()]
    x = torch.from_numpy(golden_input())
    got = block_crcs(kq.quantize(x, qtype).numpy(), TYPE_SIZES[qtype])
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert len(got) == len(want) == 102
    assert not bad, (
        f"{len(bad)} of 102 blocks differ from llama.cpp's; first {bad[0]} "
        f"(kind {bad[0] // 6}, 16 = real weights); all: {bad}"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantize_cuda_matches_cpu(qtype: T) -> None:
    x = torch.from_numpy(golden_input()).reshape(-1, 256)
    x = torch.cat([x, torch.randn(4096, 256, generator=torch.Generator().manual_seed(3))])
    fmt = kq.get_format(qtype)
    cpu = fmt.quantize_blocks(x)
    cuda = fmt.quantize_blocks(x.cuda()).cpu()
    bad = (cpu != cuda).any(dim=1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} of {x.shape[0]} blocks differ; first {bad[0]}"


# ---- quantize: error and edge cases ----


def test_round_trip_error_bounded_and_ordered() -> None:
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(7))
    err = {}
    for qtype in QUANT_TYPES:
        _, y = _round_trip(x, qtype)
        err[qtype] = _rel_rmse(x, y)
        assert err[qtype] < RMSE_BOUND[qtype], f"{qtype.name}: relative RMSE {err[qtype]:.4f}"
    assert err[T.Q6_K] < err[T.Q5_K] < err[T.Q4_K], {t.name: e for t, e in err.items()}


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_zero_blocks_are_exactly_zero(qtype: T) -> None:
    x = torch.zeros(4, 256)
    x[1] = -0.0
    q, y = _round_trip(x, qtype)
    assert int(q.count_nonzero()) == 0
    assert bool((y == 0).all())


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_constant_blocks(qtype: T) -> None:
    # Large enough that the f16 super-block scales are normal numbers (c / (15 * 63) > 2^-14
    # for Q4_K; smaller constants are in test_finite_output_over_magnitudes).
    c = torch.tensor([1.0, -1.0, 0.3, -0.3, 7.7, -7.7, 100.0, -100.0])
    x = c[:, None].expand(-1, 256).contiguous()
    _, y = _round_trip(x, qtype)
    rel = ((y - x).abs() / x.abs()).amax(dim=1)
    # f16 super-block scales (2^-11) times 6-bit scales/mins: a few parts in a thousand.
    assert bool((rel < 5e-3).all()), f"worst block {int(rel.argmax())}: {rel.tolist()}"
    # One constant per sub-block: 8 different values in a block.
    sub = torch.linspace(-2.0, 1.5, 8).repeat_interleave(32)[None]
    _, y = _round_trip(sub, qtype)
    worst = (y - sub).abs().max().item()
    assert worst < 0.02 * 2.0, f"constant sub-blocks: max error {worst}"


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_outliers_and_one_signed_blocks(qtype: T) -> None:
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(64, 256, generator=gen)
    out = g.clone()
    out[torch.arange(64), torch.randint(0, 256, (64,), generator=gen)] = 50.0 * torch.sign(
        torch.randn(64, generator=gen)
    )
    for name, x, bound in [
        ("negative", -g.abs(), RMSE_BOUND[qtype]),
        ("positive", g.abs() + 1.0, RMSE_BOUND[qtype]),
        # The outlier's sub-block gets a coarse scale; the others are unaffected.
        ("outliers", out, 4 * RMSE_BOUND[qtype]),
    ]:
        _, y = _round_trip(x, qtype)
        assert bool(torch.isfinite(y).all()), name
        rel = _rel_rmse(x, y)
        assert rel < bound, f"{name}: relative RMSE {rel:.4f} (bound {bound})"
        if name == "outliers":  # the outliers themselves come back to within a few %
            big = x.abs() == 50.0
            worst = ((y[big] - x[big]).abs() / 50.0).max().item()
            assert worst < 0.03, f"outlier error {worst}"


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_finite_output_over_magnitudes(qtype: T) -> None:
    gen = torch.Generator().manual_seed(13)
    scales = 2.0 ** torch.arange(-140, 21, 5, dtype=torch.float32)  # subnormal .. 1e6
    x = torch.randn(scales.numel(), 256, generator=gen) * scales[:, None]
    x[::3, :128] = 0.0  # half-zero blocks
    q, y = _round_trip(x, qtype)
    assert bool(torch.isfinite(y).all()), f"non-finite at {(~torch.isfinite(y)).nonzero()[:4]}"
    # Deterministic: the same input gives the same bytes.
    assert torch.equal(q, kq.get_format(qtype).quantize_blocks(x))
    # Where the f16 scales are normal numbers, the error is the usual one.
    normal = (scales > 2.0**-10) & (scales < 2.0**14)
    rel = _rel_rmse(x[normal], y[normal])
    assert rel < 1.5 * RMSE_BOUND[qtype], f"relative RMSE {rel:.4f}"


def test_quantize_rows_through_registry() -> None:
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(17))
    for qtype in QUANT_TYPES:
        raw = kq.quantize(x, qtype.name.lower())
        assert raw.shape == (3, 3 * TYPE_SIZES[qtype])
        y = kq.dequantize(raw, qtype, 768)
        blocks = kq.get_format(qtype).quantize_blocks(x.reshape(-1, 256))
        assert torch.equal(raw.reshape(-1, TYPE_SIZES[qtype]), blocks)
        assert _rel_rmse(x, y) < RMSE_BOUND[qtype]

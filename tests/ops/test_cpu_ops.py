"""The cpu op set (kiln/ops/cpu.py, cpu_pack.py) against the reference, op by op and format by
format, on small shapes (N not a multiple of 64, one group of 32, several, real-model widths).

Tolerances (|y - r| <= RTOL * A + ATOL elementwise, A the sum of the terms' magnitudes):
- packed formats (int4 planes): x is rounded to bfloat16 (relative 2**-9), each (scale, zero)
  to bfloat16 (2**-9 of |s q| and of |z| per weight), the result to bfloat16 (2**-9 of |y| <=
  2**-9 A), accumulation in float32: at most 4 * 2**-9 = 2**-7 of A, with A = |x| @ (|s| (|q| +
  16) + |z|).T (the 16 |s| covers the two-plane split's 16 s h and 8 s terms, each rounded in
  its bfloat16 scale). Measured worst: about 0.3 of that bound.
- Dense F32: the reference's own F.linear on the same values: bitwise equal.
- Dense BF16: x and the result rounded to bfloat16: 2 * 2**-9 of A.
- Dequant formats: the reference's values, float32 matmul per chunk of rows: sums in another
  blocking only, 2e-5 of A (as tests/kernels/tolerances.py's float32 formats).
- attention, rope, norms: float32 throughout, other operation order (bmm instead of SDPA,
  complex multiply, cos/sin of the same float32 angle): 2e-5 of the terms' magnitudes.
A real error (a wrong nibble, group, scale or head) is of the order of A itself.
"""

from __future__ import annotations

import sys

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from kiln import quant
from kiln.errors import UsageError
from kiln.ops import cpu, cpu_pack, get_ops, reference, resolve_backend
from kiln.weight import Weight, concat_rows

PACKED_RTOL = 2**-7
F32_RTOL = 2e-5

PLANE_FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K]
DEQUANT_FORMATS = [Q.F16, Q.Q2_K, Q.Q3_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4]
# (n, k): one group of 32, N below / not a multiple of 64 (padded rows), several row blocks;
# K-quants need rows of 256
SHAPES = [(1, 32), (5, 64), (48, 96), (100, 160), (130, 576)]
K_SHAPES = [(3, 256), (70, 512)]


def _shapes(qtype: Q) -> list[tuple[int, int]]:
    return K_SHAPES if quant.get_format(qtype).block_size == 256 else SHAPES


def _weight(qtype: Q, n: int, k: int, seed: int = 0) -> Weight:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g) * 0.1
    values[:, : k // 3] += 0.05  # offsets from zero: Q4_1 / K-quant mins do something
    if quant.get_format(qtype).quantize_blocks is None:
        raw = _random_blocks(qtype, n, k, g)
    else:
        raw = quant.quantize(values, qtype)
    return Weight(f"w_{qtype.name}", qtype, (n, k), raw)


# byte offsets of the f16 scales of the formats Kiln cannot quantize to (MXFP4: one e8m0 byte)
_SCALE_BYTES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def _random_blocks(qtype: Q, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random blocks whose scales are sane: f16 0.01 (or an e8m0 exponent near 1)."""
    fmt = quant.get_format(qtype)
    raw = torch.randint(0, 256, (n, k // fmt.block_size, fmt.type_size), generator=g)
    raw = raw.to(torch.uint8)
    if qtype == Q.MXFP4:
        raw[..., 0] = torch.randint(120, 130, raw[..., 0].shape, generator=g).to(torch.uint8)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    for at in _SCALE_BYTES.get(qtype, ()):
        raw[..., at : at + 2] = scale
    return raw.reshape(n, -1)


def _magnitudes(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """A = |x| @ (|s| (|q| + 16) + |z|).T of the w = s q + z decomposition (per weight)."""
    q, s, z = cpu_pack.affine(w.raw, w.qtype, w.shape[1])
    s = s.repeat_interleave(cpu_pack.GROUP, 1)
    z = z.repeat_interleave(cpu_pack.GROUP, 1)
    return x.abs() @ (s.abs() * (q.abs() + 16) + z.abs()).t()


def _assert_within(y: torch.Tensor, r: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    assert torch.isfinite(y).all(), f"{what}: NaN or inf in the result"
    err = (y - r).abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} outside the bound; worst at flat index "
            f"{i}: |diff| {err.flatten()[i]:.3g} > {bound.flatten()[i]:.3g}"
        )


# ---- the formats as s * q + z ----------------------------------------------------------------


@pytest.mark.parametrize("qtype", PLANE_FORMATS, ids=lambda q: q.name)
def test_affine_decomposition_is_the_reference_dequantization(qtype):
    """w = s * q + z per group of 32 (what the int4 planes are built from) equals gguf's
    dequantization: the reference rounds its float32 products once or twice, so the float64
    value is within 2 float32 ulps of each term."""
    for n, k in _shapes(qtype):
        w = _weight(qtype, n, k)
        q, s, z = cpu_pack.affine(w.raw, qtype, k)
        lo, hi = (-8, 7) if cpu_pack._AFFINE[qtype][1] == 1 else (-128, 127)
        assert lo <= int(q.min()) and int(q.max()) <= hi
        s64 = s.double().repeat_interleave(32, 1)
        z64 = z.double().repeat_interleave(32, 1)
        ours = s64 * q.double() + z64
        ref = quant.dequantize(w.raw, qtype, k).double()
        bound = 2**-22 * ((s64 * q).abs() + z64.abs() + ref.abs())
        _assert_within(ours, ref, bound, f"{qtype.name} {n}x{k}")


@pytest.mark.parametrize("qtype", PLANE_FORMATS, ids=lambda q: q.name)
def test_planes_hold_the_weights_up_to_bf16_scales(qtype):
    """The planes' values (v - 8) * scale + zero equal w = s q + z up to the rounding of each
    scale and zero to bfloat16; the packed bytes decode to the right values (any wrong nibble,
    row block or group would be off by a whole step s)."""
    for n, k in _shapes(qtype):
        w = _weight(qtype, n, k, seed=1)
        form = cpu_pack.pack(w)
        assert (
            isinstance(form, cpu_pack.Int4Planes)
            and len(form.planes) == (cpu_pack._AFFINE[qtype][1])
        )
        q, s, z = cpu_pack.affine(w.raw, qtype, k)
        s = s.repeat_interleave(32, 1)
        z = z.repeat_interleave(32, 1)
        bound = 2**-8 * (s.abs() * (q.abs() + 16) + z.abs())
        _assert_within(form.dense(), quant.dequantize(w.raw, qtype, k), bound, qtype.name)


def test_int4_packing_matches_torchs_converter():
    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 16, (192, 96), generator=g, dtype=torch.int32)
    ours = cpu_pack.pack_int4(v.to(torch.uint8))
    assert torch.equal(ours, torch._convert_weight_to_int4pack_for_cpu(v, 2))
    assert torch.equal(cpu_pack.unpack_int4(ours, 96), v.to(torch.uint8))


# ---- linear, every form ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", PLANE_FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_linear_packed_formats(qtype, m):
    for n, k in _shapes(qtype):
        w = _weight(qtype, n, k, seed=2)
        w.packed = cpu_pack.pack(w)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
        y = cpu.linear(x, w)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        bound = PACKED_RTOL * _magnitudes(x, w) + 1e-6
        _assert_within(y, reference.linear(x, w), bound, f"{qtype.name} {n}x{k} m={m}")


def test_linear_packed_error_is_bfloat16_sized():
    """The bound above is loose by design; the error itself is what bfloat16 gives: the
    result equals bfloat16(exact float64 product of bfloat16 x and the planes' values) within
    one bfloat16 step (the kernel accumulates in float32 before its one rounding)."""
    w = _weight(Q.Q4_1, 130, 576, seed=4)
    form = cpu_pack.pack(w)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(4))
    exact = x.to(torch.bfloat16).double() @ form.dense().double().t()
    bound = 2**-8 * exact.abs() + 2**-20 * (x.abs() @ form.dense().abs().t()).double()
    _assert_within(form.linear(x).double(), exact, bound, "Q4_1 planes against their exact sum")


def test_linear_f32_is_the_reference_bitwise():
    w = Weight("w", Q.F32, (70, 96), quant.quantize(torch.randn(70, 96), Q.F32))
    w.packed = cpu_pack.pack(w)
    assert isinstance(w.packed, cpu_pack.Dense)
    assert w.packed.w.data_ptr() == w.raw.data_ptr()  # a view of the bytes: no copy
    x = torch.randn(3, 96)
    assert torch.equal(cpu.linear(x, w), reference.linear(x, w))


def test_linear_bf16():
    w = Weight("w", Q.BF16, (70, 96), quant.quantize(torch.randn(70, 96), Q.BF16))
    w.packed = cpu_pack.pack(w)
    x = torch.randn(3, 96)
    bound = 2 * 2**-9 * (x.abs() @ w.dense().abs().t()) + 1e-6
    _assert_within(cpu.linear(x, w), reference.linear(x, w), bound, "BF16")


@pytest.mark.parametrize("qtype", DEQUANT_FORMATS, ids=lambda q: q.name)
def test_linear_dequantized_per_call_in_chunks(qtype, monkeypatch):
    monkeypatch.setattr(cpu_pack, "DEQUANT_VALUES", 3 * 256)  # several chunks, a short last one
    n, k = 10, 256
    w = _weight(qtype, n, k, seed=5)
    w.packed = cpu_pack.pack(w)
    assert isinstance(w.packed, cpu_pack.Dequant) and w.packed.rows == 3
    x = torch.randn(4, k)
    bound = F32_RTOL * (x.abs() @ w.dense().abs().t()) + 1e-6
    _assert_within(cpu.linear(x, w), reference.linear(x, w), bound, qtype.name)
    assert w._dense is None  # nothing kept


def test_linear_with_bias():
    w = _weight(Q.Q8_0, 40, 64)
    w.packed = cpu_pack.pack(w)
    b = Weight("b", Q.F32, (40,), quant.quantize(torch.randn(40), Q.F32))
    x = torch.randn(2, 64)
    bound = PACKED_RTOL * _magnitudes(x, w) + 1e-6
    _assert_within(cpu.linear(x, w, b), reference.linear(x, w, b), bound, "Q8_0 + bias")


# ---- merged weights ----------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "form"), [((64, 128, 64), "Int4Planes"), ((48, 20), "Concat")])
def test_merged_packed_weights_keep_no_copy_of_the_blocks(rows, form):
    """merged_qkv / merged_gate_up on the cpu backend: the parts' planes joined (row blocks of
    64) or kept side by side (a padded part); the merged weight holds no blocks of its own, and
    its reference values are the parts'."""
    parts = [_weight(Q.Q4_1, n, 96, seed=i) for i, n in enumerate(rows)]
    for p in parts:
        p.packed = cpu_pack.pack(p)
    x = torch.randn(3, 96)
    separate = torch.cat([cpu.linear(x, p) for p in parts], -1)
    merged = concat_rows("qkv", parts)
    assert merged.raw is None and type(merged.packed).__name__ == form
    assert all(p.packed is None for p in parts)  # given to the merged weight: held once
    assert merged.shape == (sum(rows), 96)
    assert torch.equal(merged.dense(), torch.cat([p.dense() for p in parts]))
    assert torch.equal(cpu.linear(x, merged), separate)


def test_merged_experts_read_their_parts():
    g = torch.Generator().manual_seed(6)
    parts = []
    for name in ("gate", "up"):
        raw = quant.quantize(torch.randn(3 * 8, 64, generator=g), Q.Q8_0).reshape(3, 8, -1)
        w = Weight(name, Q.Q8_0, (3, 8, 64), raw)
        w.packed = cpu_pack.Dequant(w)  # what prepare gives every 3-D weight's merge
        parts.append(w)
    merged = concat_rows("gate_up", parts)
    assert merged.raw is None
    for e in range(3):
        assert torch.equal(merged.expert(e), torch.cat([p.expert(e) for p in parts]))


# ---- attention, rope, norms --------------------------------------------------------------------


@pytest.mark.parametrize(("n_head", "n_kv", "d"), [(4, 4, 16), (8, 2, 8), (9, 3, 64)])
@pytest.mark.parametrize("scores", [1 << 21, 500])  # prompt queries in one pass, or in several
def test_attention_one_query_and_prompts(n_head, n_kv, d, scores, monkeypatch):
    monkeypatch.setattr(cpu, "ATTENTION_SCORES", scores)
    g = torch.Generator().manual_seed(7)
    s = 37
    k = torch.randn(s, n_kv, d, generator=g)
    v = torch.randn(s, n_kv, d, generator=g)
    scale = d**-0.5
    cases = [
        (1, torch.tensor([s - 1])),  # decode: the last key
        (5, torch.arange(s - 5, s)),  # a prompt chunk after others
        (s, torch.arange(s)),  # a whole prompt
    ]
    for t, pos in cases:
        q = torch.randn(t, n_head, d, generator=g)
        ours = cpu._causal(q, k, v, pos, scale)
        ref = reference.causal(q, k, v, pos, scale)
        bound = F32_RTOL * v.abs().max() + 1e-6
        _assert_within(ours, ref, bound.expand_as(ref), f"attention T={t} pos={pos[0]}")
    # a batch over the paged pool: a decode row over shuffled blocks of 16 (length 20), a
    # prompt chunk of 5 (length 33, blocks consecutive: read as a slice) and a decode row of
    # length 1
    from kiln.runtime.batch import ForwardBatch

    k_pool = torch.randn(6 * 16, n_kv, d, generator=g)
    v_pool = torch.randn(6 * 16, n_kv, d, generator=g)
    lens = (20, 33, 1)
    batch = ForwardBatch(
        tokens=torch.zeros(7, dtype=torch.long),
        positions=torch.tensor([19, 28, 29, 30, 31, 32, 0]),
        slots=torch.zeros(7, dtype=torch.long),
        block_tables=torch.tensor([[4, 1, 0], [2, 3, 4], [5, 0, 0]], dtype=torch.int32),
        seq_lens=torch.tensor(lens),
        query_start=torch.tensor([0, 1, 6, 7]),
        logit_rows=None,
        query_lens=(1, 5, 1),
        kv_lens=lens,
        first_rows=(None, 32, None),
        block_size=16,
    )
    q = torch.randn(7, n_head, d, generator=g)
    ours = cpu.attention(q, k_pool, v_pool, batch, scale)
    ref = reference.attention(q, k_pool, v_pool, batch, scale)
    _assert_within(ours, ref, torch.full_like(ref, 2e-5), "paged attention")
    # the gathered keys are the table's: the decode row equals attention over its rows
    rows = torch.cat([torch.arange(64, 80), torch.arange(16, 20)])
    alone = reference.causal(q[:1], k_pool[rows], v_pool[rows], torch.tensor([19]), scale)
    _assert_within(ours[:1], alone, torch.full_like(alone, 2e-5), "decode row")


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(("d", "rot"), [(16, 16), (64, 32)])
def test_rope(neox, d, rot):
    freqs = reference.rope_frequencies(rot, 10000.0, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(8)
    for positions in (torch.tensor([3]), torch.arange(5, 12), torch.tensor([6000, 2, 4099])):
        x = torch.randn(positions.shape[0], 3, d, generator=g)
        ours = cpu.rope(x, positions, freqs, neox)
        ref = reference.rope(x, positions, freqs, neox)
        bound = F32_RTOL * x.abs().max() + 1e-6  # positions beyond the first table: it grows
        _assert_within(ours, ref, bound.expand_as(ref), f"rope neox={neox} pos={positions[0]}")


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("t", [1, 4])
def test_qkv_norm_rope_of_a_merged_result(with_norm, t):
    """Q and K views of one QKV result are rotated in one call (adjacent in memory); the
    result and the cache writes equal the reference's."""
    n_head, n_kv, d = 4, 2, 16
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(t, (n_head + 2 * n_kv) * d, generator=g)
    q = qkv[:, : n_head * d].view(t, n_head, d)
    k = qkv[:, n_head * d : (n_head + n_kv) * d].view(t, n_kv, d)
    v = qkv[:, (n_head + n_kv) * d :].view(t, n_kv, d)
    assert cpu._adjacent_heads(q, k) is not None
    norms = (None, None)
    if with_norm:
        norms = tuple(
            Weight(n, Q.F32, (d,), quant.quantize(torch.rand(d, generator=g) + 0.5, Q.F32))
            for n in ("qn", "kn")
        )
    freqs = reference.rope_frequencies(d, 10000.0, None, torch.device("cpu"))
    positions = torch.arange(3, 3 + t)
    results = []
    for fn in (cpu.qkv_norm_rope, reference.qkv_norm_rope):
        kc, vc = torch.zeros(8, n_kv, d), torch.zeros(8, n_kv, d)
        out = fn(q, k, v, *norms, 1e-6, positions, positions.flip(0) - 2, freqs, False, kc, vc)
        results.append((out, kc, vc))
    for ours, ref, what in zip(results[0], results[1], ("q", "k cache", "v cache")):
        _assert_within(ours, ref, torch.full_like(ref, 1e-5), what)


def test_norms():
    g = torch.Generator().manual_seed(10)
    w = Weight("n", Q.F32, (96,), quant.quantize(torch.rand(96, generator=g) + 0.5, Q.F32))
    x, r = torch.randn(3, 96, generator=g), torch.randn(3, 96, generator=g)
    _assert_within(cpu.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5),
                   torch.full((3, 96), 1e-5), "rms_norm")  # fmt: skip
    h, y = cpu.add_rms_norm(x, r, w, 1e-5)
    h_ref, y_ref = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, h_ref)
    _assert_within(y, y_ref, torch.full_like(y, 1e-5), "add_rms_norm")


# ---- the backend ---------------------------------------------------------------------------


def test_auto_is_the_cpu_backend_on_a_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert get_ops("cpu").name == "cpu"
    with pytest.raises(UsageError, match="runs on the CPU"):
        resolve_backend("cpu", torch.device("cuda"))


def test_release_pages_touches_only_file_mappings(tmp_path):
    anon = torch.arange(1 << 16, dtype=torch.int32)
    assert not cpu_pack.release_pages(anon)
    assert torch.equal(anon, torch.arange(1 << 16, dtype=torch.int32))  # untouched
    path = tmp_path / "blob"
    data = torch.randint(0, 256, (1 << 18,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    import numpy as np

    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    assert torch.equal(mapped, data)  # every page read in
    cpu_pack.scan_file_mappings()
    if sys.platform.startswith("linux"):
        assert cpu_pack.release_pages(mapped)
    assert torch.equal(mapped, data)  # read again from the file


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")
def test_release_code_pages_gives_code_back_and_everything_still_runs():
    x = torch.randn(64, 96)
    expected = (x @ x.t()).softmax(-1)
    before = _rss_file_kib()
    assert cpu_pack.release_code_pages() > 0
    # torch's code (tens of MB resident after import) is no longer resident...
    assert _rss_file_kib() < before - 8 * 1024
    # ...and comes back on use: the same kernels give the same results
    assert torch.equal((x @ x.t()).softmax(-1), expected)
    w = torch.arange(12.0).view(3, 4)
    assert torch.equal(w.sum(0), torch.tensor([12.0, 15.0, 18.0, 21.0]))


@pytest.mark.parametrize("qtype", PLANE_FORMATS, ids=lambda q: q.name)
def test_output_projection_top_outputs_are_exact(qtype, monkeypatch):
    """The output projection keeps its exact scales: each row's REFINE_TOP largest outputs are
    float32 sums of the reference's weights (2e-5 of A, as the float32 formats), the rest stay
    within the packed bound; its exact rows are the reference's rows."""
    monkeypatch.setattr(cpu_pack, "REFINE_VALUES", 4 * 8 * 256)  # several passes over the rows
    n, k = _shapes(qtype)[-1]
    w = _weight(qtype, n, k, seed=11)
    form = cpu_pack.pack(w, exact=True)
    assert form.exact is not None
    idx = torch.tensor([0, n - 1, n // 2, 63 % n])
    ref_rows = quant.dequantize(w.raw, qtype, k)[idx]
    _assert_within(form.rows(idx), ref_rows, 2**-22 * ref_rows.abs() + 1e-7, "exact rows")
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(12))
    exact, form.exact = form.exact, None
    top = form.linear(x).topk(min(cpu_pack.REFINE_TOP, n), dim=1).indices  # the candidates
    form.exact = exact
    y, r = form.linear(x), reference.linear(x, w)
    a = x.abs() @ w.dense().abs().t()
    _assert_within(y.gather(1, top), r.gather(1, top), F32_RTOL * a.gather(1, top) + 1e-6, "top")
    _assert_within(y, r, PACKED_RTOL * _magnitudes(x, w) + 1e-6, "all outputs")
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):  # d in float16 and no zero: 2 bytes per 32 values
        assert form.exact[0].dtype == torch.float16 and form.exact[1] is None


@pytest.mark.parametrize("m", [1, 4])
def test_q8_0_output_projection_as_int8_blocks(m, monkeypatch):
    """A Q8_0 output projection with a vocabulary's rows keeps its int8 values by block of 32
    (Int8Blocks): the same bound as the planes, exact top outputs, bit-exact rows."""
    monkeypatch.setattr(cpu_pack, "INT8_MIN_ROWS", 100)
    monkeypatch.setattr(cpu_pack, "PACK_VALUES", 40 * 96)  # packed in several chunks of rows
    w = _weight(Q.Q8_0, 130, 96, seed=13)
    form = cpu_pack.pack(w, exact=True)
    assert isinstance(form, cpu_pack.Int8Blocks)
    assert form.nbytes == 130 * 96 + 130 * 3 * 2 * 2  # int8 values, bf16 + f16 scales
    assert torch.equal(form.dense(), w.dense())
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(14))
    y, r = form.linear(x), reference.linear(x, w)
    _assert_within(y, r, PACKED_RTOL * _magnitudes(x, w) + 1e-6, "Int8Blocks")
    top = r.topk(3, dim=1).indices  # far inside the refined 32
    a = x.abs() @ w.dense().abs().t()
    _assert_within(y.gather(1, top), r.gather(1, top), F32_RTOL * a.gather(1, top), "top")
    assert cpu_pack.pack(w, exact=False).__class__ is cpu_pack.Int4Planes  # not the head


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_tied_embedding_rows_come_from_the_packed_form(qtype, monkeypatch):
    """A tied embedding reads its rows from the output projection's packed form and exact
    scales (the file's pages stay unmapped): Q8_0 bit-exact, Q4_1 within float32 rounding."""
    monkeypatch.setattr(cpu_pack, "INT8_MIN_ROWS", 100)
    w = _weight(qtype, 130, 96, seed=15)
    w.packed = cpu_pack.pack(w, exact=True)
    ids = torch.tensor([0, 129, 64, 63, 7, 7])
    ours, ref = cpu.embedding(w, ids), reference.embedding(w, ids)
    if qtype == Q.Q8_0:
        assert torch.equal(ours, ref)
    _assert_within(ours, ref, 2**-22 * (ref.abs() + 1), "embedding rows")

"""kiln.kernels.moe.expert_linear against kiln.ops.reference.expert_linear, and the reference
against an explicit per-slot loop.

Random expert weights quantized one expert at a time and stacked as a GGUF stores them. ids
[T, k] for T = 1, 2, 3, 8 tokens and k = 1, 2, 8 slots, with repeats (inside a row and across
rows), out of order, the first and the last expert; x with one row per token ([T, K]: the
gate/up case, a token's slots share its row) or one per slot ([T*k, K]: the down case). Outputs
are allocated poisoned (NaN), so a row the kernel does not write fails. On the CPU this runs
through Triton's interpreter on tiny shapes; on a GPU the same cases add Qwen3-30B-A3B's shapes
(128 experts, gate/up 768 x 2048, down 2048 x 768).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.ops import reference
from kiln.weight import Weight, concat_rows
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import (
    ACTS,
    CAPTURE_PTX,
    FORMATS,
    WIDE,
    _check,
    check_lanes_loads,
    record_launches,
)
from tests.kernels.test_router import _PoisonedTorch
from tests.kernels.tolerances import MATVEC

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# One token's ids, k = 1, 2, 8 slots over 5 experts: repeats, out of order, the first and the
# last expert.
IDS = ([3], [4, 1], [4, 0, 2, 2, 4, 1, 3, 0])
# Batches of tokens, [T, k] over 5 experts: every row shares experts with another row, so a slot
# that reads the wrong token's x row still finds "its" expert and only the x row tells. Every
# format runs the first; the kernel's row mapping does not depend on the format, so the others
# (and T = 8, k = 8: qwen3moe's batched decode) run on one format of each kernel.
BATCHES = (
    [[4, 1], [1, 4], [0, 1]],  # T = 3, k = 2: rows 0 and 1 the same experts, swapped
    [[2], [0], [2], [4], [1], [3], [2], [0]],  # T = 8, k = 1
    [[4, 0, 2, 2, 4, 1, 3, 0], [0, 3, 3, 1, 4, 2, 0, 1]],  # T = 2, k = 8
    [[(3 * t + 2 * j) % 5 for j in range(8)] for t in range(8)],  # T = 8, k = 8
)


@pytest.fixture
def moe(monkeypatch):
    """kiln.kernels.moe, with its output allocated poisoned (NaN)."""
    from kiln.kernels import matvec, moe

    if not CUDA and not matvec._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    monkeypatch.setattr(moe, "torch", _PoisonedTorch())
    return moe


def _experts(fmt: str, n_expert: int, n: int, k: int, gen: torch.Generator) -> Weight:
    """[n_expert, n, k] weight: each expert quantized on its own (on gen's device), raw blocks
    stacked."""
    qtype = GGMLQuantizationType[fmt]
    dev = gen.device
    raw = [
        quant.quantize(torch.randn(n, k, generator=gen, device=dev), qtype) for _ in range(n_expert)
    ]
    return Weight(f"exps_{fmt}", qtype, (n_expert, n, k), torch.stack(raw).to(DEVICE))


def _per_slot(x: torch.Tensor, ids: torch.Tensor, w: Weight) -> torch.Tensor:
    """The contract written out, slot by slot: row t*k + j = x[t or t*k + j] @ W[ids[t, j]].T."""
    t, k = ids.shape
    per_slot = x.shape[0] == t * k
    rows = []
    for ti, row in enumerate(ids.tolist()):
        for j, e in enumerate(row):
            xr = x[ti * k + j if per_slot else ti].float()
            rows.append(xr @ w.expert(e).T)
    return torch.stack(rows) if rows else torch.empty(0, w.shape[1])


def _bound(x: torch.Tensor, ids: torch.Tensor, w: Weight) -> torch.Tensor:
    """MATVEC's bound for each slot: atol + rtol * |x row| @ |W[e]|.T."""
    rtol, atol, _reason = MATVEC[(w.qtype.name, x.dtype)]
    t, k = ids.shape
    xa = x.float().abs()
    rows = xa if x.shape[0] == t * k else xa.repeat_interleave(k, dim=0)
    dense = torch.stack([w.expert(int(e)) for e in ids.flatten().tolist()]).abs()  # [T*k, N, K]
    return atol + rtol * torch.einsum("sk,snk->sn", rows, dense)


def _compare(moe, x: torch.Tensor, ids: torch.Tensor, w: Weight, what: str) -> torch.Tensor:
    y = moe.expert_linear(x, ids, w)
    ref = reference.expert_linear(x, ids, w)
    _check(y, ref, _bound(x, ids, w), what)
    return y


def _cases(block: int, shared_x: bool) -> list[tuple[int, int, int]]:
    """(n_expert, N, K): K = 3 blocks (not a power of two: the wide kernels pad their last step)
    or an odd K for the float formats; N odd, so the last row tile is ragged. On a GPU also
    Qwen3-30B-A3B's gate/up (x per token) or down (x per slot)."""
    cases = [(5, 9, 3 * block if block > 1 else 95)]
    if CUDA:
        cases.append((128, 768, 2048) if shared_x else (128, 2048, 768))
    return cases


def _ids(rows: list[list[int]], n_expert: int, dtype: torch.dtype) -> torch.Tensor:
    if n_expert > 5:  # real shapes: spread the ids over all experts
        rows = [[e * (n_expert - 1) // 4 for e in r] for r in rows]
    return torch.tensor(rows, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("shared_x", (True, False), ids=("x_per_token", "x_per_slot"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_linear_matches_reference(fmt: str, shared_x: bool, moe, monkeypatch) -> None:
    """Every format, one token (k = 1, 2, 8) and a batch (T = 3, k = 2; on Q4_0 and F16, the
    lanes and the byte kernel, also T = 8, 2, 8 with k = 1, 8, 8), x per token and per slot,
    int64 and int32 ids; the launch's kernel and its SLOTS_PER_X (1 where every slot has its
    own row or one row is shared: the one-token launches' code)."""
    launched = record_launches(monkeypatch)
    act = ACTS[FORMATS.index(fmt) % len(ACTS)]  # every activation dtype over the formats
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(99)
    batches = BATCHES if fmt in ("Q4_0", "F16") else BATCHES[:1]
    for n_expert, n, k in _cases(block, shared_x):
        wgen = torch.Generator(DEVICE).manual_seed(n) if n_expert > 5 else gen
        w = _experts(fmt, n_expert, n, k, wgen)
        for i, chosen in enumerate([[r] for r in IDS] + list(batches)):
            ids = _ids(chosen, n_expert, (torch.int64, torch.int32)[i % 2])
            t, used = ids.shape
            rows = t if shared_x else t * used
            x = torch.randn(rows, k, generator=gen).to(act).to(DEVICE)
            what = f"{fmt} x:{tuple(x.shape)} {act} ids={chosen} ({ids.dtype}) E={n_expert} N={n}"
            _compare(moe, x, ids, w, what)
            name, consts = launched[-1]
            want = WIDE.get(fmt, "_matvec_kernel")
            assert name == want, f"{what}: ran {name}, not {want}"
            per_x = used if shared_x and t > 1 else 1
            assert consts["SLOTS_PER_X"] == per_x, f"{what}: SLOTS_PER_X {consts['SLOTS_PER_X']}"


@pytest.mark.parametrize("fmt", ("Q4_K", "F16"))
def test_expert_linear_token_alone(fmt: str, moe) -> None:
    """Each token's rows of a batch (T = 3, k = 2; x per token and per slot) are bitwise its
    own one-token launch's: the same K loop, only the pointers move (a batch decodes each
    sequence as it decodes alone)."""
    gen = torch.Generator().manual_seed(8)
    block = quant.get_format(fmt).block_size
    w = _experts(fmt, 5, 9, 2 * block if block > 1 else 64, gen)
    ids = torch.tensor(BATCHES[0], device=DEVICE)
    for rows in (3, 6):
        x = torch.randn(rows, w.shape[2], generator=gen).to(DEVICE)
        y = moe.expert_linear(x, ids, w)
        for t in range(3):
            xt = x[t : t + 1] if rows == 3 else x[2 * t : 2 * t + 2]
            alone = moe.expert_linear(xt.contiguous(), ids[t : t + 1], w)
            assert torch.equal(y[2 * t : 2 * t + 2], alone), f"{fmt} x:{rows} token {t}"


@pytest.mark.parametrize("fmt", tuple(WIDE))
def test_expert_linear_byte_kernel(fmt: str, moe, monkeypatch) -> None:
    """The formats that have M = 1 integer-view kernels, on the byte kernel (USE_WIDE off): one
    token with x per slot, two tokens with x per token."""
    from kiln.kernels import matvec

    monkeypatch.setattr(matvec, "USE_WIDE", False)
    launched = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    w = _experts(fmt, 5, 9, 3 * quant.get_format(fmt).block_size, gen)
    for chosen, rows in (([IDS[2]], 8), (BATCHES[0], 3)):
        ids = torch.tensor(chosen, device=DEVICE)
        x = torch.randn(rows, w.shape[2], generator=gen).to(DEVICE)
        _compare(moe, x, ids, w, f"{fmt} byte kernel ids={chosen}")
        assert launched[-1][0] == "_matvec_kernel", launched[-1][0]


def test_reference_is_the_per_slot_contract() -> None:
    """reference.expert_linear (the oracle of the kernel tests) against the contract written
    out slot by slot, for T = 1, 2, 3, 8 and k = 1, 2, 8, x per token and per slot."""
    gen = torch.Generator().manual_seed(21)
    w = _experts("Q8_0", 5, 7, 64, gen)
    for chosen in [[r] for r in IDS] + list(BATCHES):
        ids = torch.tensor(chosen, device=DEVICE)
        t, k = ids.shape
        for rows in (t, t * k):
            x = torch.randn(rows, 64, generator=gen).to(DEVICE)
            y = reference.expert_linear(x, ids, w)
            want = _per_slot(x, ids, w)
            _check(y, want, _bound(x, ids, w), f"reference T={t} k={k} x rows {rows}")


def test_reference_one_token_reads_a_shared_row_in_place() -> None:
    """At T = 1 with x [1, K] every slot reads the same row (a stride-0 view, as before batches:
    the same einsum on the same values), so one token's result is bitwise the per-slot
    stacking of x [1, K] @ W[e].T computed through the same einsum with an expanded row."""
    gen = torch.Generator().manual_seed(22)
    w = _experts("Q4_K", 5, 9, 256, gen)
    ids = torch.tensor([IDS[2]], device=DEVICE)
    x = torch.randn(1, 256, generator=gen).to(DEVICE)
    dense = torch.stack([w.expert(e) for e in IDS[2]])
    want = torch.einsum("sk,snk->sn", x.float().expand(8, -1), dense)
    assert torch.equal(reference.expert_linear(x, ids, w), want)


@pytest.mark.parametrize("keep_dense", (False, True), ids=("blocks", "dense"))
@pytest.mark.parametrize("fmt", ("F16", "BF16", "Q4_K", "Q6_K", "Q8_0", "Q5_1"))
def test_reference_has_no_host_sync(fmt: str, keep_dense: bool, monkeypatch) -> None:
    """reference.expert_linear gathers the experts by index on the device: no Tensor.tolist,
    .item or int() of a tensor (each a host sync on a GPU, which a CUDA graph cannot capture),
    with the weight's blocks or its float copy (keep_dense)."""
    gen = torch.Generator().manual_seed(23)
    w = _experts(fmt, 5, 9, 256, gen)
    w = Weight(w.name, w.qtype, w.shape, w.raw, keep_dense=keep_dense)
    ids = torch.tensor(BATCHES[0], device=DEVICE)
    x = torch.randn(3, 256, generator=gen).to(DEVICE)
    want = _per_slot(x, ids, w)

    def host_sync(*_args, **_kwargs):
        raise AssertionError("reference.expert_linear synchronized with the host")

    for name in ("tolist", "item", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    y = reference.expert_linear(x, ids, w)
    monkeypatch.undo()
    _check(y, want, _bound(x, ids, w), f"{fmt} keep_dense={keep_dense}")


def test_reference_merged_weight_reads_its_parts(monkeypatch) -> None:
    """A merged gate/up weight whose blocks stay in its parts (raw None: the cpu backend's
    packed merge) gives bitwise what the same weight with its blocks concatenated gives, and
    gathers the selected experts of each part, never the whole stack (dense() unused)."""
    gen = torch.Generator().manual_seed(24)
    gate, up = _experts("Q4_K", 5, 9, 256, gen), _experts("Q4_K", 5, 7, 256, gen)

    class _Packed:  # the form concat_rows merges without copying the parts' blocks
        def concat(self, forms):
            return self

    for p in (gate, up):
        p.packed = _Packed()
    merged = concat_rows("ffn_gate_up_exps", [gate, up])
    assert merged.raw is None and merged.parts == (gate, up)
    flat = Weight("flat", gate.qtype, (5, 16, 256), torch.cat([gate.raw, up.raw], dim=1))
    ids = torch.tensor(BATCHES[2], device=DEVICE)
    x = torch.randn(2, 256, generator=gen).to(DEVICE)
    want = reference.expert_linear(x, ids, flat)
    monkeypatch.setattr(Weight, "dense", lambda self: pytest.fail("dequantized the whole stack"))
    assert torch.equal(reference.expert_linear(x, ids, merged), want)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (the CPU test patches the syncs)")
def test_expert_linear_captures_in_a_cuda_graph() -> None:
    """The reference and the kernel, captured in a CUDA graph and replayed with other ids and
    x: no host sync inside (capture fails on one), and the replay computes the new inputs."""
    from kiln.kernels import moe

    gen = torch.Generator().manual_seed(25)
    w = _experts("Q4_K", 5, 9, 256, gen)
    ids = torch.tensor(BATCHES[0], device=DEVICE)
    x = torch.randn(3, 256, generator=gen).to(DEVICE)
    for fn in (reference.expert_linear, moe.expert_linear):
        fn(x, ids, w)  # warm up (compile, allocator) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(x, ids, w)
        ids.copy_(torch.tensor(BATCHES[0][::-1], device=DEVICE))
        x.copy_(torch.randn(3, 256, generator=gen).to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        want = _per_slot(x, ids, w)
        _check(out, want, _bound(x, ids, w), f"{fn.__module__} replayed")


def test_expert_linear_merged_gate_up(moe) -> None:
    """A gate/up weight [E, 2F, K] concatenated along dim 1 is N = 2F; each row's sum is computed
    the same way as in the separate launches (F = 9: the row tiles of the halves do not line
    up), so the halves are bitwise equal to them; one token and a batch of three."""
    gen = torch.Generator().manual_seed(11)
    gate, up = _experts("Q4_K", 5, 9, 512, gen), _experts("Q4_K", 5, 9, 512, gen)
    merged = Weight("gate_up", gate.qtype, (5, 18, 512), torch.cat([gate.raw, up.raw], dim=1))
    for chosen in ([IDS[1]], BATCHES[0]):
        ids = torch.tensor(chosen, device=DEVICE)
        x = torch.randn(len(chosen), 512, generator=gen).to(DEVICE)
        y = _compare(moe, x, ids, merged, f"Q4_K merged gate/up {chosen}")
        assert torch.equal(y[:, :9], moe.expert_linear(x, ids, gate))
        assert torch.equal(y[:, 9:], moe.expert_linear(x, ids, up))


@pytest.mark.parametrize("fmt", ("Q4_K", "Q4_0"))
def test_expert_linear_slot_is_the_plain_matvec(fmt: str, moe) -> None:
    """One slot with a non-contiguous stack of experts (every other expert of a larger one) is
    bitwise the plain mat-vec of that expert: the same kernel, the same K loop; so is token 1's
    slot of a two-token batch with x per token."""
    from kiln.kernels import matvec

    gen = torch.Generator().manual_seed(3)
    big = _experts(fmt, 6, 9, 512, gen)
    w = Weight("every_other", big.qtype, (3, 9, 512), big.raw[1::2])
    plain = Weight("expert_5", big.qtype, (9, 512), big.raw[5])
    x = torch.randn(2, 512, generator=gen).to(DEVICE)
    y = moe.expert_linear(x[:1], torch.tensor([[2]], device=DEVICE), w)
    assert torch.equal(y, matvec.matvec(x[:1], plain))
    y = moe.expert_linear(x, torch.tensor([[0, 1], [1, 2]], device=DEVICE), w)
    assert torch.equal(y[3:], matvec.matvec(x[1:], plain))


def test_expert_linear_rejects_bad_input(moe) -> None:
    gen = torch.Generator().manual_seed(0)
    w = _experts("Q8_0", 3, 4, 64, gen)
    ids = torch.tensor([[0, 2]], device=DEVICE)
    x = torch.zeros(1, 64, device=DEVICE)
    with pytest.raises(AssertionError, match="K=32"):
        moe.expert_linear(torch.zeros(1, 32, device=DEVICE), ids, w)
    with pytest.raises(AssertionError, match="one per slot"):
        moe.expert_linear(torch.zeros(3, 64, device=DEVICE), ids, w)
    with pytest.raises(AssertionError, match="one per slot"):  # 2 tokens: 2 or 4 rows
        moe.expert_linear(torch.zeros(3, 64, device=DEVICE), ids.expand(2, 2).contiguous(), w)
    with pytest.raises(AssertionError, match="int32/int64"):
        moe.expert_linear(x, ids.float(), w)
    with pytest.raises(AssertionError, match=r"\[T, k\]"):  # one token's ids as a vector
        moe.expert_linear(x, ids[0], w)
    with pytest.raises(AssertionError, match="contiguous"):
        moe.expert_linear(x.expand(2, 64).contiguous(), ids.expand(2, 2).T, w)
    with pytest.raises(AssertionError, match="n_expert, N, K"):
        moe.expert_linear(x, ids, Weight("w", w.qtype, (4, 64), w.raw[0]))
    many = torch.zeros(moe.MAX_SLOTS // 8 + 1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="at most 65535 slots"):
        moe.expert_linear(torch.zeros(many.shape[0], 64, device=DEVICE), many, w)
    assert moe.expert_linear(x[:0], ids[:0], w).shape == (0, 4)


# Every kernel variant expert_linear launches for Qwen3-30B-A3B (128 experts, top-8; gate/up
# [128, 768, 2048] with x [T, 2048], merged gate/up N = 1536, down [128, 2048, 768] with x
# [T * 8, 768]) as the model calls it (x float32, int64 ids from topk) at T = 1 and at T = 8 (x
# per token: SLOTS_PER_X = 8) in the formats of its usual GGUFs and the legacy 4/5-bit ones
# (K = 768: 24 blocks, a step of 32 overruns K), the byte kernel for formats that normally take
# an integer-view kernel (USE_WIDE off), and the other activation and id dtypes on one wide and
# one byte-kernel format and on Q4_0.
_COMPILE = CAPTURE_PTX + textwrap.dedent(
    """
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from kiln.kernels import matvec, moe
    from kiln.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, e, n, k):
        bv, ts = GGML_QUANT_SIZES[q]
        return Weight("w", q, (e, n, k), torch.empty(e, n, k // bv * ts, dtype=torch.uint8))

    f32, i64 = torch.float32, torch.int64
    formats = (T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q5_K, T.BF16)
    variants = [(q, True, f32, i64, 1) for q in formats]
    variants += [(q, True, f32, i64, 8) for q in formats]
    variants += [(q, False, f32, i64, t) for q in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0) for t in (1, 8)]
    variants += [(q, True, torch.float16, torch.int32, 1) for q in (T.Q4_K, T.Q4_0, T.Q8_0)]
    variants += [(q, True, torch.bfloat16, i64, 1) for q in (T.Q4_K, T.Q4_0, T.Q5_1)]
    with compile_only() as done:
        capture_ptx()
        for q, wide, act, ids_dtype, t in variants:
            matvec.USE_WIDE = wide
            ids = torch.zeros(t, 8, dtype=ids_dtype)
            for n, k, rows in ((768, 2048, t), (1536, 2048, t), (2048, 768, 8 * t)):
                x = torch.empty(rows, k, dtype=act)
                moe.expert_linear(x, ids, weight(q, 128, n, k))
                print(q.name, wide, act, ids_dtype, t, n, k, rows, done[-1].kernel, loads())
    """
)


def test_expert_linear_compiles_for_sm90() -> None:
    out = run_compile_check(_COMPILE)
    lines = [line.split() for line in out.splitlines()]
    assert len(lines) == (9 + 9 + 8 + 3 + 3) * 3, out
    for fmt, wide, *_launch, kernel, loads in lines:
        want = WIDE.get(fmt, "_matvec_kernel") if wide == "True" else "_matvec_kernel"
        assert kernel == want, f"{fmt} (USE_WIDE={wide}) compiled {kernel}, not {want}"
        if kernel == "_matvec_lanes_m1_kernel":
            check_lanes_loads(fmt, loads)

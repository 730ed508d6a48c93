"""kiln.kernels.router (route_topk, combine) against kiln.ops.reference (moe_select,
moe_combine), the reference combine against the sum written out, and the triton op set's
moe_route / moe_ffn on them.

Outputs are allocated poisoned (NaN weights, id -1) so a slot the kernel does not write fails.
Router logits are drawn with no two probabilities close (torch.topk does not specify the order
of ties; route_topk takes the lowest index, checked on its own). Batches of T = 1, 2, 3, 8
tokens, k = 1, 2, 8 slots; each token of a batch gets bitwise what it gets alone. On the CPU
this runs through Triton's interpreter; on a GPU the same cases add real expert counts and
widths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln.ops import reference
from kiln.weight import Weight
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import ROUTER

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]

# (E, k): qwen3-30b-a3b; qwen1.5-moe-like odd sizes; mixtral; one expert; 256 (deepseek-v3).
ROUTES = [(128, 8), (60, 4), (8, 2), (1, 1), (256, 8)]
if CUDA:
    ROUTES += [(512, 10), (1024, 16)]
# (T, k, N): qwen3-30b-a3b's n_embd; odd N with a ragged last block; one slot; one column; and
# batches of 2, 3, 8 tokens.
COMBINES = [(1, 8, 2048), (1, 4, 333), (1, 1, 17), (1, 2, 1), (2, 8, 300), (3, 2, 333)]
COMBINES += [(8, 1, 17), (8, 8, 520)]
if CUDA:
    COMBINES += [(1, 8, 4096), (8, 8, 7168), (3, 10, 2880)]


def _kernels():
    from kiln.kernels import router

    if not CUDA and not router._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return router


class _PoisonedTorch:
    """torch, except that torch.empty fills floats with NaN and integers with -1."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs) -> torch.Tensor:
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.fixture
def router(monkeypatch):
    """The launchers, with their outputs allocated poisoned."""
    mod = _kernels()
    monkeypatch.setattr(mod, "torch", _PoisonedTorch())
    return mod


def _logits(t: int, e: int, gen: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """[t, e] logits: each row a random permutation of values spread over ~12 (a real router's
    range), at least 6 / e apart (their probabilities differ by >= 0.6% at e = 1024, far above
    any rounding), shifted by a random or given offset."""
    gap = 12.0 / e
    rows = []
    for _ in range(t):
        ranks = torch.randperm(e, generator=gen).float()
        jitter = torch.rand(e, generator=gen) * (gap / 2)
        shift = offset or float(torch.randn(1, generator=gen)) * 4
        rows.append(ranks * gap + jitter + shift - 6.0)
    return torch.stack(rows).to(DEVICE)


def _check_route(router, logits: torch.Tensor, k: int, normalize: bool, what: str) -> None:
    w, ids = router.route_topk(logits, k, normalize)
    ref_w, ref_ids = reference.moe_select(logits, k, normalize)
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape and ids.is_contiguous(), what
    assert w.is_contiguous(), what
    if not torch.equal(ids, ref_ids):
        pytest.fail(f"{what}: ids {ids.tolist()} != reference {ref_ids.tolist()}")
    rtol, atol, _reason = ROUTER["route_topk.weights"]
    _check(w, ref_w, atol + rtol * ref_w.abs(), f"{what}: weights")


@pytest.mark.parametrize("normalize", (True, False), ids=("normalize", "raw"))
def test_route_topk_matches_reference(router, normalize: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    for e, k in ROUTES:
        for rep in range(3):  # fresh logits each time
            _check_route(router, _logits(1, e, gen), k, normalize, f"E={e} k={k} #{rep}")
    # several rows (one program each), and logits far from 0 (the max is subtracted)
    for t, e, k in ((2, 128, 8), (3, 60, 4), (8, 128, 8), (8, 8, 1)):
        _check_route(router, _logits(t, e, gen), k, normalize, f"T={t} E={e} k={k}")
    _check_route(router, _logits(1, 128, gen, offset=1000.0), 8, normalize, "offset 1000")
    _check_route(router, _logits(1, 128, gen, offset=-1000.0), 8, normalize, "offset -1000")


def test_route_topk_rows_are_independent(router) -> None:
    """Each row of a batch of 8 (logits shifted differently per row) gets bitwise what it gets
    alone: one program per row, nothing shared."""
    gen = torch.Generator().manual_seed(17)
    logits = torch.cat([_logits(1, 128, gen, offset=float(100 * t - 300)) for t in range(8)])
    w, ids = router.route_topk(logits, 8, True)
    for t in range(8):
        w1, ids1 = router.route_topk(logits[t : t + 1], 8, True)
        assert torch.equal(ids[t : t + 1], ids1) and torch.equal(w[t : t + 1], w1), f"row {t}"


def test_route_topk_row_stride(router) -> None:
    """Logits as column slices of a wider result (any row stride)."""
    gen = torch.Generator().manual_seed(8)
    wide = _logits(2, 256, gen)
    _check_route(router, wide[:, 64:192], 8, True, "E=128 slice of 256")


def test_route_topk_ties_take_the_lowest_index(router) -> None:
    """Equal probabilities: the lowest expert index first (torch.topk leaves this open)."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0, 1.0, 0.0]], device=DEVICE)
    w, ids = router.route_topk(logits, 5, False)
    assert ids.tolist() == [[1, 3, 4, 2, 6]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(w[0], p[[1, 3, 4, 2, 6]], rtol=1e-6, atol=0.0)
    w, ids = router.route_topk(torch.zeros(1, 60, device=DEVICE), 4, True)  # all equal
    assert ids.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(w, torch.full((1, 4), 0.25, device=DEVICE), rtol=1e-6, atol=0.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf / NaN
def test_route_topk_degenerate_logits_give_ids_in_range(router) -> None:
    """-inf logits (probability 0) are still chosen after the others, never twice; NaN logits
    give NaN weights but ids inside [0, E), since the expert mat-vecs read them unchecked."""
    ninf = float("-inf")
    logits = torch.tensor([[ninf, 1.0, ninf, 0.0, ninf, ninf]], device=DEVICE)
    w, ids = router.route_topk(logits, 4, False)
    assert ids[0, :2].tolist() == [1, 3]
    assert sorted(set(ids[0].tolist())) == sorted(ids[0].tolist()), ids  # distinct
    assert w[0, 2:].tolist() == [0.0, 0.0]
    w, ids = router.route_topk(torch.full((1, 60), float("nan"), device=DEVICE), 4, True)
    assert ((ids >= 0) & (ids < 60)).all(), ids


def _combine_case(
    t: int, k: int, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """down [t*k, n] as the left columns of a wider tensor (row stride n + 3), weights [t, k]
    each row summing to 1, as a [t, 2k] tensor's even columns (stride 2)."""
    down = (torch.randn(t * k, n + 3, generator=gen) * 3).to(DEVICE)[:, :n]
    w = torch.rand(t, 2 * k, generator=gen)
    w = (w / w[:, ::2].sum(1, keepdim=True)).to(DEVICE)[:, ::2]
    return down, w


def _combine_bound(down: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ROUTER["combine"]'s bound: atol + rtol * sum_j |w[t, j] * down[t*k + j]|."""
    rtol, atol, _reason = ROUTER["combine"]
    t, k = w.shape
    return atol + rtol * (down.abs().reshape(t, k, -1) * w.abs()[:, :, None]).sum(1)


def test_combine_matches_reference(router) -> None:
    gen = torch.Generator().manual_seed(9)
    for t, k, n in COMBINES:
        for layout in ("strided", "contiguous"):
            down, w = _combine_case(t, k, n, gen)
            if layout == "contiguous":
                down, w = down.contiguous(), w.contiguous()
            y = router.combine(down, w)
            ref = reference.moe_combine(down, w)
            _check(y, ref, _combine_bound(down, w), f"combine T={t} k={k} N={n} {layout}")
            assert y.is_contiguous()


def test_combine_tokens_are_independent(router) -> None:
    """Each token of a batch of 8 gets bitwise what it gets alone (its own weights, its own k
    rows of down, summed in slot order)."""
    gen = torch.Generator().manual_seed(19)
    down, w = _combine_case(8, 8, 300, gen)
    y = router.combine(down, w)
    for t in range(8):
        alone = router.combine(down[8 * t : 8 * t + 8], w[t : t + 1])
        assert torch.equal(y[t : t + 1], alone), f"token {t}"


def test_reference_combine_is_the_weighted_sum() -> None:
    """reference.moe_combine (the oracle above) against the sum written out token by token and
    slot by slot; at T = 1 bitwise the one-token form (down * weights[0, :, None]).sum(0)."""
    gen = torch.Generator().manual_seed(20)
    for t, k, n in COMBINES:
        down, w = _combine_case(t, k, n, gen)
        want = torch.stack([sum(w[ti, j] * down[ti * k + j] for j in range(k)) for ti in range(t)])
        _check(reference.moe_combine(down, w), want, _combine_bound(down, w), f"T={t} k={k}")
        if t == 1:
            one = (down * w[0, :, None]).sum(0, keepdim=True)
            assert torch.equal(reference.moe_combine(down, w), one), f"k={k} N={n}"


def test_router_rejects_bad_input() -> None:
    router = _kernels()
    with pytest.raises(AssertionError, match="k <= n_expert"):
        router.route_topk(torch.zeros(1, 4, device=DEVICE), 5, True)
    with pytest.raises(AssertionError, match="float32"):
        router.route_topk(torch.zeros(1, 8, dtype=torch.float16, device=DEVICE), 2, True)
    with pytest.raises(AssertionError, match="experts"):
        router.route_topk(torch.zeros(1, router.MAX_E + 1, device=DEVICE), 2, True)
    with pytest.raises(AssertionError, match=r"T\*k = 2\*8 = 16 rows"):
        router.combine(torch.zeros(8, 16, device=DEVICE), torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(AssertionError, match=r"\[T, k\]"):
        router.combine(torch.zeros(8, 16, device=DEVICE), torch.zeros(8, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous last dim"):
        router.combine(torch.zeros(16, 8, device=DEVICE).T, torch.zeros(1, 8, device=DEVICE))


def _weight(name: str, fmt: str, dense: torch.Tensor) -> Weight:
    from kiln import quant

    qtype = GGMLQuantizationType[fmt]
    return Weight(name, qtype, tuple(dense.shape), quant.quantize(dense, qtype).to(DEVICE))


def test_triton_op_set_moe(monkeypatch) -> None:
    """The triton op set's moe_route runs route_topk for 1..8 rows and the reference's selection
    above; its moe_ffn runs the experts per row (expert_linear, merged gate/up or separate) and
    combine for 1..8 rows, the grouped GEMM (bf16 activations: a looser bound) and combine
    above; both match the reference."""
    router = _kernels()
    from kiln.kernels import moe
    from kiln.ops import get_ops

    calls: list[str] = []
    spied = ((router, "route_topk"), (router, "combine"), (moe, "expert_linear"))
    for mod, name in spied + ((moe, "grouped_expert_linear"),):
        fn = getattr(mod, name)
        monkeypatch.setattr(
            mod, name, lambda *a, _f=fn, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )
    ops = get_ops("triton")
    gen = torch.Generator().manual_seed(10)
    e, dim, f, k = 6, 64, 32, 2
    router_w = _weight("ffn_gate_inp", "F32", torch.randn(e, dim, generator=gen) / 8)
    for t, kernel in ((1, True), (3, True), (8, True), (9, False)):
        x = torch.randn(t, dim, generator=gen).to(DEVICE)
        weights, ids = ops.moe_route(x, router_w, k, True)
        ref_w, ref_ids = reference.moe_route(x, router_w, k, True)
        assert torch.equal(ids, ref_ids), (ids, ref_ids)
        rtol, atol, _reason = ROUTER["route_topk.weights"]
        _check(weights, ref_w, atol + 1e-4 * ref_w.abs(), f"moe_route T={t}")  # + mat-vec error
        assert calls == (["route_topk"] if kernel else []), f"T={t}: {calls}"
        calls.clear()
    gate = _weight("gate", "Q8_0", torch.randn(e, f, dim, generator=gen))
    up = _weight("up", "Q8_0", torch.randn(e, f, dim, generator=gen))
    down = _weight("down", "Q8_0", torch.randn(e, dim, f, generator=gen) / 8)
    merged = Weight("gate_up", gate.qtype, (e, 2 * f, dim), torch.cat([gate.raw, up.raw], 1))
    for t, linear in ((1, "expert_linear"), (2, "expert_linear"), (9, "grouped_expert_linear")):
        x = torch.randn(t, dim, generator=gen).to(DEVICE)
        weights, ids = reference.moe_route(x, router_w, k, True)
        want = reference.moe_ffn(x, weights, ids, gate, up, down)
        for g, u in ((gate, up), (merged, None)):
            y = ops.moe_ffn(x, weights, ids, g, u, down)
            if linear == "expert_linear":
                bound = 1e-4 * (1 + want.abs())
            else:  # bf16 x and weights in two mat-muls (the grouped GEMM's own bound: its tests)
                bound = 1e-2 * (1 + want.abs().amax())
            _check(y, want, bound, f"moe_ffn T={t} merged={u is None}")
            assert calls == [linear] * (2 if u is None else 3) + ["combine"], f"T={t}: {calls}"
            calls.clear()


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from kiln.kernels import router
from tests.kernels.sm90 import compile_only

with compile_only() as done:
    for normalize in (True, False):
        router.route_topk(torch.zeros(1, 128), 8, normalize)  # qwen3-30b-a3b
    router.route_topk(torch.zeros(1, 60), 4, True)  # odd E, 4 slots
    router.route_topk(torch.zeros(1, 1024), 16, True)  # the most experts: 4 warps
    router.route_topk(torch.zeros(8, 128), 8, True)  # a batch of 8 tokens
    router.combine(torch.zeros(8, 2048), torch.zeros(1, 8))  # qwen3-30b-a3b's n_embd
    router.combine(torch.zeros(4, 333), torch.zeros(1, 8)[:, ::2])  # ragged, weights stride 2
    router.combine(torch.zeros(64, 2048), torch.zeros(8, 8))  # a batch of 8 tokens
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_router_kernels_compile_for_sm90() -> None:
    """Every launched variant compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_route_topk_kernel") == 5, out
    assert names.count("_moe_combine_kernel") == 3, out
    print(out)

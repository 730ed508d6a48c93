"""kiln.kernels.moe.expert_linear against kiln.ops.reference.expert_linear.

Random expert weights quantized one expert at a time and stacked as a GGUF stores them; ids with
repeats and out of order, k = 1, 2, 8; x shared by every slot ([1, K]: gate/up) or one row per
slot ([k, K]: down). On the CPU this runs through Triton's interpreter on tiny shapes; on a GPU
the same cases add Qwen3-30B-A3B's shapes (128 experts, gate/up 768 x 2048, down 2048 x 768).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.ops.reference import expert_linear
from kiln.weight import Weight
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
from tests.kernels.tolerances import MATVEC

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# k = 1, 2, 8 slots over 5 experts: repeats, out of order, the first and the last expert.
IDS = ([3], [4, 1], [4, 0, 2, 2, 4, 1, 3, 0])


def _experts(fmt: str, n_expert: int, n: int, k: int, gen: torch.Generator) -> Weight:
    """[n_expert, n, k] weight: each expert quantized on its own (on gen's device), raw blocks
    stacked."""
    qtype = GGMLQuantizationType[fmt]
    dev = gen.device
    raw = [
        quant.quantize(torch.randn(n, k, generator=gen, device=dev), qtype) for _ in range(n_expert)
    ]
    return Weight(f"exps_{fmt}", qtype, (n_expert, n, k), torch.stack(raw).to(DEVICE))


def _kernel():
    from kiln.kernels import matvec, moe

    if not CUDA and not matvec._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return moe


def _compare(moe, x: torch.Tensor, ids: torch.Tensor, w: Weight, what: str) -> torch.Tensor:
    rtol, atol, _reason = MATVEC[(w.qtype.name, x.dtype)]
    y = moe.expert_linear(x, ids, w)
    ref = expert_linear(x, ids, w)
    dense = torch.stack([w.expert(int(e)) for e in ids.tolist()])  # [k, N, K]
    rows = x.float().abs().expand(ids.shape[0], -1)
    bound = atol + rtol * torch.einsum("sk,snk->sn", rows, dense.abs())
    _check(y, ref, bound, what)
    return y


def _cases(block: int, shared_x: bool) -> list[tuple[int, int, int]]:
    """(n_expert, N, K): K = 3 blocks (not a power of two: the wide kernels pad their last step)
    or an odd K for the float formats; N odd, so the last row tile is ragged. On a GPU also
    Qwen3-30B-A3B's gate/up (x shared) or down (x per slot)."""
    cases = [(5, 9, 3 * block if block > 1 else 95)]
    if CUDA:
        cases.append((128, 768, 2048) if shared_x else (128, 2048, 768))
    return cases


@pytest.mark.parametrize("shared_x", (True, False), ids=("x_shared", "x_per_slot"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_linear_matches_reference(fmt: str, shared_x: bool, monkeypatch) -> None:
    moe = _kernel()
    launched = record_launches(monkeypatch)
    act = ACTS[FORMATS.index(fmt) % len(ACTS)]  # every activation dtype over the formats
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(99)
    for n_expert, n, k in _cases(block, shared_x):
        wgen = torch.Generator(DEVICE).manual_seed(n) if n_expert > 5 else gen
        w = _experts(fmt, n_expert, n, k, wgen)
        for i, chosen in enumerate(IDS):
            if n_expert > 5:  # real shapes: spread the ids over all experts
                chosen = [e * (n_expert - 1) // 4 for e in chosen]
            ids = torch.tensor(chosen, dtype=(torch.int64, torch.int32)[i % 2], device=DEVICE)
            rows = 1 if shared_x else len(chosen)
            x = torch.randn(rows, k, generator=gen).to(act).to(DEVICE)
            what = f"{fmt} x:{tuple(x.shape)} {act} ids={chosen} ({ids.dtype}) E={n_expert} N={n}"
            _compare(moe, x, ids, w, what)
            want = WIDE.get(fmt, "_matvec_kernel")
            assert launched[-1][0] == want, f"{what}: ran {launched[-1][0]}, not {want}"


@pytest.mark.parametrize("fmt", tuple(WIDE))
def test_expert_linear_byte_kernel(fmt: str, monkeypatch) -> None:
    """The formats that have M = 1 integer-view kernels, on the byte kernel (USE_WIDE off)."""
    moe = _kernel()
    from kiln.kernels import matvec

    monkeypatch.setattr(matvec, "USE_WIDE", False)
    launched = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    w = _experts(fmt, 5, 9, 3 * quant.get_format(fmt).block_size, gen)
    ids = torch.tensor(IDS[2], device=DEVICE)
    x = torch.randn(len(IDS[2]), w.shape[2], generator=gen).to(DEVICE)
    _compare(moe, x, ids, w, f"{fmt} byte kernel")
    assert launched[-1][0] == "_matvec_kernel", launched[-1][0]


def test_expert_linear_merged_gate_up() -> None:
    """A gate/up weight [E, 2F, K] concatenated along dim 1 is N = 2F; each row's sum is computed
    the same way as in the separate launches (F = 9: the row tiles of the halves do not line
    up), so the halves are bitwise equal to them."""
    moe = _kernel()
    gen = torch.Generator().manual_seed(11)
    gate, up = _experts("Q4_K", 5, 9, 512, gen), _experts("Q4_K", 5, 9, 512, gen)
    merged = Weight("gate_up", gate.qtype, (5, 18, 512), torch.cat([gate.raw, up.raw], dim=1))
    ids = torch.tensor(IDS[1], device=DEVICE)
    x = torch.randn(1, 512, generator=gen).to(DEVICE)
    y = _compare(moe, x, ids, merged, "Q4_K merged gate/up")
    assert torch.equal(y[:, :9], moe.expert_linear(x, ids, gate))
    assert torch.equal(y[:, 9:], moe.expert_linear(x, ids, up))


@pytest.mark.parametrize("fmt", ("Q4_K", "Q4_0"))
def test_expert_linear_slot_is_the_plain_matvec(fmt: str) -> None:
    """One slot with a non-contiguous stack of experts (every other expert of a larger one) is
    bitwise the plain mat-vec of that expert: the same kernel, the same K loop."""
    moe = _kernel()
    from kiln.kernels import matvec

    gen = torch.Generator().manual_seed(3)
    big = _experts(fmt, 6, 9, 512, gen)
    w = Weight("every_other", big.qtype, (3, 9, 512), big.raw[1::2])
    x = torch.randn(1, 512, generator=gen).to(DEVICE)
    y = moe.expert_linear(x, torch.tensor([2], device=DEVICE), w)
    plain = Weight("expert_5", big.qtype, (9, 512), big.raw[5])
    assert torch.equal(y, matvec.matvec(x, plain))


def test_expert_linear_rejects_bad_input() -> None:
    moe = _kernel()
    gen = torch.Generator().manual_seed(0)
    w = _experts("Q8_0", 3, 4, 64, gen)
    ids = torch.tensor([0, 2], device=DEVICE)
    with pytest.raises(AssertionError, match="K=32"):
        moe.expert_linear(torch.zeros(1, 32, device=DEVICE), ids, w)
    with pytest.raises(AssertionError, match="one per slot"):
        moe.expert_linear(torch.zeros(3, 64, device=DEVICE), ids, w)
    with pytest.raises(AssertionError, match="int32/int64"):
        moe.expert_linear(torch.zeros(1, 64, device=DEVICE), ids.float(), w)
    with pytest.raises(AssertionError, match="n_expert, N, K"):
        moe.expert_linear(
            torch.zeros(1, 64, device=DEVICE), ids, Weight("w", w.qtype, (4, 64), w.raw[0])
        )
    assert moe.expert_linear(torch.zeros(1, 64, device=DEVICE), ids[:0], w).shape == (0, 4)


# Every kernel variant expert_linear launches for Qwen3-30B-A3B (128 experts, top-8; gate/up
# [128, 768, 2048] with x [1, 2048], merged gate/up N = 1536, down [128, 2048, 768] with x
# [8, 768]) as the model calls it (x float32, int64 ids from topk) in the formats of its usual
# GGUFs and the legacy 4/5-bit ones (K = 768: 24 blocks, a step of 32 overruns K), the byte
# kernel for formats that normally take an integer-view kernel (USE_WIDE off), and the other
# activation and id dtypes on one wide and one byte-kernel format and on Q4_0.
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
    variants = [(q, True, f32, i64) for q in formats]
    variants += [(q, False, f32, i64) for q in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0)]
    variants += [(q, True, torch.float16, torch.int32) for q in (T.Q4_K, T.Q4_0, T.Q8_0)]
    variants += [(q, True, torch.bfloat16, i64) for q in (T.Q4_K, T.Q4_0, T.Q5_1)]
    with compile_only() as done:
        capture_ptx()
        for q, wide, act, ids_dtype in variants:
            matvec.USE_WIDE = wide
            ids = torch.zeros(8, dtype=ids_dtype)
            for n, k, rows in ((768, 2048, 1), (1536, 2048, 1), (2048, 768, 8)):
                x = torch.empty(rows, k, dtype=act)
                moe.expert_linear(x, ids, weight(q, 128, n, k))
                print(q.name, wide, act, ids_dtype, n, k, rows, done[-1].kernel, loads())
    """
)


def test_expert_linear_compiles_for_sm90() -> None:
    out = run_compile_check(_COMPILE)
    lines = [line.split() for line in out.splitlines()]
    assert len(lines) == (9 + 4 + 3 + 3) * 3, out
    for fmt, wide, *_launch, kernel, loads in lines:
        want = WIDE.get(fmt, "_matvec_kernel") if wide == "True" else "_matvec_kernel"
        assert kernel == want, f"{fmt} (USE_WIDE={wide}) compiled {kernel}, not {want}"
        if kernel == "_matvec_lanes_m1_kernel":
            check_lanes_loads(fmt, loads)

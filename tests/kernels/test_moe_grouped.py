"""kiln.kernels.moe's grouped GEMM of MoE prompts (plan, grouped_expert_linear and its unfused
per-expert form) against kiln.ops.reference.expert_linear.

The plan is checked for what the kernel relies on: every slot once, each block one expert's,
padding marked. The GEMM rounds x and the weights to bf16 as the dense GEMM does, so it is held
to tolerances.MATMUL's bound (tests/kernels/test_matmul.py). Routings: uniform, skewed onto one
expert, experts with no tokens, T from 9 to 130 tokens and k = 1, 2, 8; x per token (gate/up)
and per slot (down); block sizes 16..128. Outputs are allocated poisoned (NaN), so a row no
program writes fails. On the CPU through Triton's interpreter on tiny shapes; on a GPU also
Qwen3-30B-A3B's expert shapes at 512 tokens.
"""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from kiln import quant
from kiln.ops import reference
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matmul import FORMATS, SMEM_LIMIT
from tests.kernels.test_matvec import CAPTURE_PTX, _check, record_launches
from tests.kernels.test_moe import _experts
from tests.kernels.test_router import _PoisonedTorch
from tests.kernels.tolerances import MATMUL, QUANTS_REL

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def moe(monkeypatch):
    """kiln.kernels.moe with its outputs allocated poisoned (NaN)."""
    from kiln.kernels import moe

    monkeypatch.setattr(moe, "torch", _PoisonedTorch())
    return moe


def _routing(kind: str, t: int, k: int, n_expert: int, gen: torch.Generator) -> torch.Tensor:
    """ids [T, k], k distinct experts a token as a router's top-k gives them."""
    if kind == "uniform":
        scores = torch.rand(t, n_expert, generator=gen)
    elif kind == "skewed":  # most tokens on expert 1, the last expert never chosen
        scores = torch.rand(t, n_expert, generator=gen)
        scores[:, 1] += 2.0
        scores[:, -1] -= 5.0
    else:
        raise ValueError(kind)
    return scores.topk(k, dim=-1).indices.to(DEVICE)


def _bound(x: torch.Tensor, ids: torch.Tensor, w) -> torch.Tensor:
    l2, l1, atol, _reason = MATMUL[w.qtype.name]
    t, k = ids.shape
    xf = x.float() if x.shape[0] == t * k else x.float().repeat_interleave(k, dim=0)
    dense = torch.stack([w.expert(int(e)) for e in ids.flatten().tolist()])  # [T*k, N, K]
    l1_term = torch.einsum("sk,snk->sn", xf.abs(), dense.abs())
    l2_term = torch.einsum("sk,snk->sn", xf * xf, dense * dense).sqrt()
    return atol + l1 * l1_term + l2 * l2_term


@pytest.mark.parametrize("kind", ("uniform", "skewed"))
@pytest.mark.parametrize("t,k", ((9, 2), (33, 1), (130, 8)))
def test_plan_sorts_every_slot_once(moe, kind, t, k) -> None:
    n_expert = 8
    ids = _routing(kind, t, k, n_expert, torch.Generator().manual_seed(t))
    p = moe.plan(ids, n_expert)
    slots = p.sorted_slots.view(-1, p.block_m).cpu()
    experts = p.block_expert.cpu()
    flat = ids.reshape(-1).cpu()
    real = slots[slots < t * k]
    assert sorted(real.tolist()) == list(range(t * k)), "each slot exactly once"
    for b in range(slots.shape[0]):
        row = slots[b][slots[b] < t * k]
        if experts[b] < 0:
            assert row.numel() == 0, f"block {b} has no expert but holds slots"
        else:
            assert (flat[row] == experts[b]).all(), f"block {b} mixes experts"
            assert row.tolist() == sorted(row.tolist()), "slot order kept within an expert"
    assert (experts[experts >= 0].diff() >= 0).all(), "blocks in expert order"


@pytest.mark.parametrize("shared_x", (True, False), ids=("x_per_token", "x_per_slot"))
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "F32"] + ["F32"])
def test_grouped_matches_reference(fmt: str, shared_x: bool, moe, monkeypatch) -> None:
    launched = record_launches(monkeypatch)
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(7)
    k_dim = 2 * block if block > 1 else 48
    cases = [(5, 33, k_dim, 9, 2, "uniform"), (5, 17, k_dim, 40, 1, "skewed")]
    if fmt in ("Q4_K", "Q8_0"):
        cases.append((6, 33, k_dim, 70, 4, "skewed"))
    if CUDA:
        cases.append((128, 768 if shared_x else 2048, 2048 if shared_x else 768, 512, 8, "uniform"))
    for n_expert, n, kk, t, k, kind in cases:
        wgen = torch.Generator(DEVICE).manual_seed(n) if n_expert > 8 else gen
        w = _experts(fmt, n_expert, n, kk, wgen)
        ids = _routing(kind, t, k, n_expert, gen)
        x = torch.randn(t if shared_x else t * k, kk, generator=gen).to(DEVICE)
        p = moe.plan(ids, n_expert)
        y = moe.grouped_expert_linear(x, p, w)
        assert launched[-1][0] == "_grouped_matmul_kernel", launched[-1][0]
        what = f"{fmt} E={n_expert} N={n} K={kk} T={t} k={k} {kind} block_m={p.block_m}"
        _check(y, reference.expert_linear(x, ids, w), _bound(x, ids, w), what)
        if n_expert <= 8:
            assert torch.equal(moe.per_expert_linear(x, p, w), y), f"{what}: unfused differs"


@pytest.mark.parametrize("shared_x", (True, False), ids=("x_per_token", "x_per_slot"))
@pytest.mark.parametrize("fmt", ("Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"))
def test_grouped_quant_domain(fmt: str, shared_x: bool, moe) -> None:
    """The grouped GEMM in the quant domain (MatmulConfig.quants) against the reference of the
    bf16-rounded x within tolerances.QUANTS_REL (as the dense GEMM's); the unfused form gives
    the same bits."""
    block = quant.get_format(fmt).block_size
    gen = torch.Generator().manual_seed(11)
    k_dim = 2 * block if block > 32 else 96
    cases = [(5, 33, 9, 2, "uniform"), (6, 40, 70, 4, "skewed")]
    if CUDA:
        cases.append((128, 768, 512, 8, "uniform"))
    for n_expert, n, t, k, kind in cases:
        kk = 2048 if n_expert > 8 else k_dim
        wgen = gen if n_expert <= 8 else torch.Generator(DEVICE).manual_seed(n)
        w = _experts(fmt, n_expert, n, kk, wgen)
        ids = _routing(kind, t, k, n_expert, gen)
        x = torch.randn(t if shared_x else t * k, kk, generator=gen).to(DEVICE)
        p = moe.plan(ids, n_expert)
        cfg = dataclasses.replace(moe.grouped_config(p.block_m), block_k=256, quants=True)
        y = moe.grouped_expert_linear(x, p, w, config=cfg)
        what = f"quants {fmt} E={n_expert} N={n} K={kk} T={t} k={k} {kind} block_m={p.block_m}"
        xb = x.to(torch.bfloat16).float()
        xs = xb if x.shape[0] == t * k else xb.repeat_interleave(k, dim=0)
        dense = torch.stack([w.expert(int(e)) for e in ids.flatten().tolist()]).double()
        ref = torch.einsum("sk,snk->sn", xs.double(), dense)
        bound = 1e-6 + QUANTS_REL * torch.einsum("sk,snk->sn", xs.abs().double(), dense.abs())
        _check(y, ref.float(), bound.float(), what)
        if n_expert <= 8:
            assert torch.equal(moe.per_expert_linear(x, p, w, config=cfg), y), what


@pytest.mark.parametrize("block_m", (16, 32, 64, 128))
def test_block_sizes(moe, block_m) -> None:
    gen = torch.Generator().manual_seed(block_m)
    w = _experts("Q4_0", 4, 40, 64, gen)
    ids = _routing("skewed", 37, 2, 4, gen)
    x = torch.randn(37, 64, generator=gen).to(DEVICE)
    p = moe.plan(ids, 4, block_m=block_m)
    y = moe.grouped_expert_linear(x, p, w)
    _check(y, reference.expert_linear(x, ids, w), _bound(x, ids, w), f"block_m {block_m}")


# The grouped GEMM of every format at each block size (and three in the quant domain), and the
# exact GEMM (batched decode): for an H100 (sm_90), with the tensor-core instructions of the PTX
# and the shared memory.
_COMPILE = CAPTURE_PTX + textwrap.dedent(
    """
    import re
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from kiln.kernels import matmul, moe
    from kiln.weight import Weight
    from tests.kernels.sm90 import compile_only

    def weight(q, e, n, k):
        bv, ts = GGML_QUANT_SIZES[q]
        shape = (e, n, k) if e else (n, k)
        raw = torch.empty(*shape[:-1], k // bv * ts, dtype=torch.uint8)
        return Weight("w", q, shape, raw)

    def mma():
        ops = re.findall(r"\\b(wgmma\\.mma_async|mma\\.sync)\\.", _ptx[-1])
        return ",".join(sorted(set(ops))) or "none"

    formats = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
    with compile_only() as done:
        capture_ptx()
        for q in formats:
            for bm in (16, 128):
                slots = torch.zeros(1024, dtype=torch.int32)
                blocks = torch.zeros(1024 // bm, dtype=torch.int32)
                plan = moe.GroupedPlan(slots, blocks, 512, 8, 128, bm)
                moe.grouped_expert_linear(torch.empty(64, 2048), plan, weight(q, 128, 768, 2048))
                c = done[-1]
                print("grouped", q.name, bm, c.kernel, c.shared_bytes, mma())
            matmul.matmul(torch.empty(8, 4096), weight(q, 0, 4096, 4096), exact=True)
            c = done[-1]
            print("exact", q.name, 8, c.kernel, c.shared_bytes, mma())
        for q in (T.Q4_K, T.Q6_K, T.Q4_0):  # the quant domain at 16 slots a block
            slots = torch.zeros(1024, dtype=torch.int32)
            plan = moe.GroupedPlan(slots, torch.zeros(64, dtype=torch.int32), 512, 8, 128, 16)
            cfg = matmul.MatmulConfig(16, 64, 256, 1, 4, 3, quants=True)
            moe.grouped_expert_linear(
                torch.empty(64, 2048), plan, weight(q, 128, 768, 2048), config=cfg
            )
            c = done[-1]
            print("grouped-quants", q.name, 16, c.kernel, c.shared_bytes, mma())
    """
)


def test_grouped_and_exact_gemm_compile_for_sm90() -> None:
    lines = [line.split() for line in run_compile_check(_COMPILE).splitlines()]
    assert len(lines) == 3 * len(FORMATS) + 3, lines
    for what, fmt, m, kernel, shared, mma in lines:
        assert int(shared) <= SMEM_LIMIT, f"{what} {fmt} {m}: {shared} B of shared memory"
        want = "_grouped_matmul_kernel" if what.startswith("grouped") else "_matmul_kernel"
        assert kernel == want, (what, fmt, kernel)
        assert mma == "wgmma.mma_async", f"{what} {fmt} {m}: tensor-core instructions {mma}"

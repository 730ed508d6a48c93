"""kiln.kernels.flash_attention.attention_prefill (causal flash attention of prompt chunks over the
paged KV pool) against kiln.ops.reference.attention over the same ForwardBatch.

Every case is one launch over a batch whose sequences own shuffled blocks of one pool (neither a
sequence's blocks nor the sequences in pool order); table entries past a sequence's blocks point
at a spare block. Every pool row that holds no position of a sequence (the spare blocks, the tail
of each sequence's last block) is NaN: any read of one shows up as NaN in the output. On the CPU
this runs through Triton's interpreter on small pools (~0.1-0.5 s a launch: few launches, split
between the parametrizations); on a GPU the same cases add the real sizes (pp512 and pp2048 at
depth 0 and 4096, a mixed batch beside a long chunk) and a CUDA-graph replay.

The bound of an output element of query t, head h (see FLASH_ATTENTION in tolerances.py):
    |y - r| <= atol + rtol * (1 + S_th) * sum_j w_thj |v_j|
over the keys j that t sees; w: the reference softmax weights; S_th = max_j scale * sum_d
|q_thd k_jd|, the largest magnitude of the terms of a score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kiln.ops import reference
from kiln.quant.kv import QuantizedRows
from kiln.runtime.batch import ForwardBatch
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import FLASH_ATTENTION, rotated_bound

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ids = {"ids": lambda d: str(d).removeprefix("torch.")}

# (H, Hkv, D): GQA groups 1, 2, 4 and 3 (SmolLM2's 9/3: tiles straddle tokens); D = 64, 128 and
# 80 (padded to 128, masked).
HEADS = [(4, 4, 64), (8, 4, 128), (8, 2, 64), (6, 2, 80)]
if CUDA:
    HEADS += [(16, 8, 128), (32, 8, 128), (32, 4, 128), (16, 8, 256)]


def _kernel():
    from kiln.kernels import flash_attention

    if not CUDA and not flash_attention._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return flash_attention


def _small(flash):
    """Tiles of 16 rows, steps of 16 keys: many tiles per sequence and several diagonal steps
    at the interpreter's small sizes."""
    return flash.FlashConfig(block_r=16, block_n=16, num_warps=4, num_stages=2)


@dataclass
class Case:
    """A batch: q [T, H, D], the pools [S, Hkv, D] / [S, Hkv, Dv], and the ForwardBatch (its
    device tensors are what the kernel reads; the reference reads its host lengths too)."""

    q: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    batch: ForwardBatch

    def args(self) -> tuple:
        b = self.batch
        return (
            self.q,
            self.k_pool,
            self.v_pool,
            b.block_tables,
            b.seq_lens,
            b.query_start,
            b.positions,
            b.block_size,
            max(b.query_lens),
        )


def _case(
    qlens, starts, heads, block_size, dtype, q_dtype, gen, dv=None, q_scale=1.0, spare=2, nb=None
) -> Case:
    """Sequence b runs qlens[b] queries at positions starts[b] .. starts[b] + qlens[b] - 1 and
    owns ceil(kv_len / block_size) blocks drawn from a shuffled order of the pool's; `spare`
    blocks are nobody's. Rows that hold no position of a sequence are NaN."""
    h, hkv, d = heads
    dv = dv or d
    kv_lens = [s + n for s, n in zip(starts, qlens)]
    need = [-(-n // block_size) for n in kv_lens]
    nb = nb or max(need) + 1
    total = sum(need) + spare
    order = torch.randperm(total, generator=torch.Generator().manual_seed(sum(kv_lens) + total))
    table = torch.full((len(qlens), nb), int(order[-1]), dtype=torch.int32)
    visible = torch.zeros(total * block_size, dtype=torch.bool)
    first = 0
    for b, (n, m) in enumerate(zip(kv_lens, need)):
        blocks = order[first : first + m]
        first += m
        table[b, :m] = blocks.to(torch.int32)
        visible[(blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]] = True
    n_tok = sum(qlens)
    q = (q_scale * torch.randn(n_tok, h, d, generator=gen, device=DEVICE)).to(q_dtype)
    k = torch.randn(total * block_size, hkv, d, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(total * block_size, hkv, dv, generator=gen, device=DEVICE).to(dtype)
    hidden = ~visible.to(DEVICE)
    k[hidden] = float("nan")
    v[hidden] = float("nan")
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, qlens)])
    query_start = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()])
    batch = ForwardBatch(
        tokens=torch.zeros(n_tok, dtype=torch.int64, device=DEVICE),
        positions=positions.to(DEVICE),
        slots=torch.zeros(n_tok, dtype=torch.int64, device=DEVICE),  # not read by attention
        block_tables=table.to(DEVICE),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int64, device=DEVICE),
        query_start=query_start.to(DEVICE),
        logit_rows=None,
        query_lens=tuple(qlens),
        kv_lens=tuple(kv_lens),
        first_rows=(None,) * len(qlens),  # the reference gathers through the tables too
        block_size=block_size,
    )
    return Case(q, k, v, batch)


def _compare(y, c: Case, scale: float, what: str) -> None:
    """y [T, H, Dv] against the reference (which reads only each sequence's rows)."""
    ref = reference.attention(c.q, c.k_pool, c.v_pool, c.batch, scale)  # [T, H, Dv]
    assert bool(torch.isfinite(ref).all()), f"{what}: the reference read a hidden (NaN) row"
    bt, bs = c.batch.block_tables.cpu().long(), c.batch.block_size
    group = c.q.shape[1] // c.k_pool.shape[1]
    # a block type's values are rounded to f16 (the tests pair them with f16 pools only)
    quantized = isinstance(c.k_pool, QuantizedRows) or isinstance(c.v_pool, QuantizedRows)
    rtol, atol, _reason = FLASH_ATTENTION["blocks as f16" if quantized else c.k_pool.dtype]
    bounds, start = [], 0
    for b, (n, length) in enumerate(zip(c.batch.query_lens, c.batch.kv_lens)):
        rows = (bt[b, :, None] * bs + torch.arange(bs)).reshape(-1)[:length].to(DEVICE)
        kf = c.k_pool[rows].float().repeat_interleave(group, dim=1)  # [L, H, D]
        vf = c.v_pool[rows].float().repeat_interleave(group, dim=1)  # [L, H, Dv]
        qf = c.q[start : start + n].float()  # [n, H, D]
        pos = c.batch.positions[start : start + n]
        seen = torch.arange(length, device=DEVICE)[None, :] <= pos[:, None]  # [n, L]
        scores = scale * torch.einsum("thd,lhd->thl", qf, kf)
        w = torch.softmax(scores.masked_fill(~seen[:, None, :], float("-inf")), dim=-1)
        terms = scale * torch.einsum("thd,lhd->thl", qf.abs(), kf.abs())
        terms = terms.masked_fill(~seen[:, None, :], 0).amax(dim=-1)  # S: [n, H]
        mag = torch.einsum("thl,lhd->thd", w, vf.abs())  # [n, H, Dv]
        bound = atol + rtol * (1 + terms[..., None]) * mag
        if getattr(c.v_pool, "rotated", False):  # the output rotated back (both sides)
            bound = rotated_bound(bound, mag)
        bounds.append(bound)
        start += n
    _check(y, ref, torch.cat(bounds), f"{what} qlens={c.batch.query_lens} bs={c.batch.block_size}")


def _cases(small) -> list[tuple[tuple[int, ...], tuple[int, ...], int, object]]:
    """(query lengths, first positions, block size, config), one launch each: one sequence from
    position 0 (T = 1, 17, 64, 130: one and several tiles, a partial last tile), a chunk at a
    depth (positions 100..150), a mixed batch (1, 33 and 7 queries at different depths: a
    decode row beside prompt chunks), block sizes 16 and 64, the default config (tiles of 128
    rows, 64- or 32-key steps) and `small` (16 x 16)."""
    cases = [
        ((1,), (0,), 16, small),
        ((17,), (0,), 64, None),
        ((64,), (0,), 16, small),
        ((130,), (0,), 64, None),
        ((51,), (100,), 16, small),
        ((51,), (100,), 64, None),
        ((1, 33, 7), (40, 0, 97), 64, small),
        ((1, 33, 7), (130, 5, 64), 16, None),
    ]
    if CUDA:
        cases += [
            ((512,), (0,), 64, None),
            ((512,), (4096,), 64, None),
            ((2048,), (0,), 64, None),
            ((2048,), (4096,), 16, None),
            ((1, 512, 37, 1, 200), (4000, 0, 3000, 17, 900), 64, None),
            ((300, 1, 129), (0, 5000, 64), 128, small),
        ]
    return cases


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
@pytest.mark.parametrize("heads", HEADS, ids=lambda t: "H{}_Hkv{}_D{}".format(*t))
def test_flash_attention_matches_reference(heads, dtype) -> None:
    """On the CPU each (heads, dtype) runs half of the cases, alternating, so that every case
    still meets every head shape and every dtype."""
    flash = _kernel()
    d = heads[2]
    scale = d**-0.5
    gen = torch.Generator(DEVICE).manual_seed(heads[0] * 1000 + d)
    cases = _cases(_small(flash))
    if not CUDA:
        parity = (HEADS.index(heads) + DTYPES.index(dtype)) % 2
        cases = cases[parity::2]
    for qlens, starts, bs, cfg in cases:
        c = _case(qlens, starts, heads, bs, dtype, torch.float32, gen)
        y = flash.attention_prefill(*c.args(), scale, cfg)
        _compare(y, c, scale, f"{heads} {dtype} {cfg}")


@pytest.mark.parametrize("kv", (("q8_0", "q8_0"), ("q4_0", "f16"), ("f16", "q4_0")))
def test_flash_attention_reads_quantized_pools(kv) -> None:
    """-ctk/-ctv q8_0 and q4_0: prompt chunks over block-type pools (and one beside f16), the
    blocks dequantized in the kernel, their values rounded to f16, the output rotated back where
    V's rows are stored rotated (head size 64); hidden rows (NaN once dequantized) never read."""
    from tests.kernels.test_attention import quantized

    flash = _kernel()
    heads = (8, 2, 64)
    gen = torch.Generator(DEVICE).manual_seed(len(kv[0]) + 3 * len(kv[1]))
    cases = _cases(_small(flash))
    for qlens, starts, bs, cfg in cases if CUDA else cases[4:7]:
        c = _case(qlens, starts, heads, bs, torch.float32, torch.float32, gen)
        c = Case(c.q, quantized(c.k_pool, kv[0]), quantized(c.v_pool, kv[1]), c.batch)
        y = flash.attention_prefill(*c.args(), 64**-0.5, cfg)
        _compare(y, c, 64**-0.5, f"K {kv[0]} V {kv[1]} {cfg}")


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
def test_flash_attention_peaked_softmax_q_dtypes_and_dv(dtype) -> None:
    """Larger scores (q * 3: a few keys take most of the weight, the running max moves between
    steps), q in f16/bf16 (the activation dtypes), Dv != D (64/32; 80/48: padded and masked)."""
    flash = _kernel()
    gen = torch.Generator(DEVICE).manual_seed(5)
    q_dtype = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}.get(dtype, dtype)
    small = _small(flash)
    for qlens, starts, heads, dv, q_scale, qdt, cfg in (
        ((40, 3), (0, 50), (8, 2, 64), 32, 3.0, torch.float32, small),
        ((1, 20), (9, 30), (8, 4, 80), 48, 1.0, q_dtype, None),
    ):
        c = _case(qlens, starts, heads, 16, dtype, qdt, gen, dv=dv, q_scale=q_scale)
        y = flash.attention_prefill(*c.args(), heads[2] ** -0.5, cfg)
        _compare(y, c, heads[2] ** -0.5, f"q:{qdt} x{q_scale} Dv={dv} {cfg}")


_DEVICE_FIELDS = ("positions", "block_tables", "seq_lens", "query_start")


def _refill(dst: Case, src: Case) -> None:
    """Copy src's queries, pools, starts, positions, tables and lengths into dst's tensors (same
    shapes); dst's batch takes src's host fields."""
    for a, b in ((dst.q, src.q), (dst.k_pool, src.k_pool), (dst.v_pool, src.v_pool)):
        a.copy_(b)
    for name in _DEVICE_FIELDS:
        getattr(dst.batch, name).copy_(getattr(src.batch, name))
    keep = {name: getattr(dst.batch, name) for name in _DEVICE_FIELDS}
    dst.batch = dataclasses.replace(src.batch, **keep)


def test_flash_attention_reads_the_batch_on_the_device() -> None:
    """One set of launch arguments (T = 24 queries of B = 3 sequences, max_query_len = T as the
    bound) serves every split of the queries, every depth and every block table: only the values
    in query_start, positions, seq_lens, block_tables and the pools change (as in a replayed CUDA
    graph), and every output follows."""
    flash = _kernel()
    heads, bs, nb = (6, 2, 32), 16, 8
    gen = torch.Generator(DEVICE).manual_seed(9)
    cfg = flash.FlashConfig(block_r=32, block_n=16, num_warps=4, num_stages=2)
    splits = (((1, 16, 7), (0, 40, 9)), ((8, 8, 8), (70, 0, 33)), ((22, 1, 1), (7, 0, 100)))
    total = max(sum(-(-(s + n) // bs) for n, s in zip(*split)) for split in splits) + 1
    live = None
    for qlens, starts in splits:
        spare = total - sum(-(-(s + n) // bs) for n, s in zip(qlens, starts))
        c = _case(qlens, starts, heads, bs, torch.float16, torch.float32, gen, spare=spare, nb=nb)
        if live is None:
            live = _case(
                qlens, starts, heads, bs, torch.float16, torch.float32, gen, spare=spare, nb=nb
            )
        _refill(live, c)
        y = flash.attention_prefill(*live.args()[:-1], 24, 0.2, cfg)
        _compare(y, live, 0.2, "device-read")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_flash_attention_cuda_graph_replay() -> None:
    """Captured once (T = 1024 queries of B = 3 sequences, qwen3-8b's heads, bf16 cache) and
    replayed with new splits, depths, tables and pools written into the captured tensors."""
    flash = _kernel()
    heads, bs, nb = (32, 8, 128), 64, 80
    gen = torch.Generator(DEVICE).manual_seed(11)
    splits = (
        ((1000, 1, 23), (0, 4000, 9)),
        ((1, 1022, 1), (5000, 3000, 0)),
        ((341, 342, 341), (64, 0, 4095)),
    )
    total = max(sum(-(-(s + n) // bs) for n, s in zip(*split)) for split in splits) + 1

    def case(qlens, starts):
        spare = total - sum(-(-(s + n) // bs) for n, s in zip(qlens, starts))
        return _case(
            qlens, starts, heads, bs, torch.bfloat16, torch.float32, gen, spare=spare, nb=nb
        )

    live = case(*splits[0])
    scale = heads[2] ** -0.5
    flash.attention_prefill(*live.args()[:-1], 1024, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = flash.attention_prefill(*live.args()[:-1], 1024, scale)
    for split in splits[1:] + splits[:1]:
        _refill(live, case(*split))
        graph.replay()
        torch.cuda.synchronize()
        _compare(y, live, scale, "graph replay")


def test_grid_covers_every_tile() -> None:
    """n_tiles (the grid, from the shapes and max_query_len) is at least the tiles the kernel
    finds (sum_b ceil(n_b * G / R)) for any split of the queries, and exact for one sequence."""
    from kiln.kernels.flash_attention import n_tiles

    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        b = int(torch.randint(1, 9, (1,), generator=gen))
        lens = torch.randint(1, 300, (b,), generator=gen).tolist()
        group = int(torch.randint(1, 9, (1,), generator=gen))
        r = 2 ** int(torch.randint(4, 8, (1,), generator=gen))
        tiles = sum(-(-n * group // r) for n in lens)
        assert n_tiles(sum(lens), b, group, max(lens), r) >= tiles, (lens, group, r)
        assert n_tiles(lens[0], 1, group, lens[0], r) == -(-lens[0] * group // r)


def test_triton_op_set_runs_prompts_on_the_kernel(monkeypatch) -> None:
    """The triton op set's attention: a batch with a prompt chunk goes to attention_prefill (one
    launch, max_query_len from the host lengths); a decode batch stays on flash-decoding."""
    flash = _kernel()
    from kiln.kernels import attention as decode
    from kiln.ops import triton_backend

    calls = []  # (launcher, its arguments after the pools)

    def recording(module, name):
        real = getattr(module, name)

        def record(*args, **kwargs):
            calls.append((name, args[3:]))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    recording(flash, "attention_prefill")
    recording(decode, "attention_decode")
    attention = triton_backend.ops()["attention"]
    gen = torch.Generator(DEVICE).manual_seed(3)
    c = _case((1, 9, 2), (20, 3, 0), (4, 2, 32), 16, torch.float16, torch.float32, gen)
    _compare(attention(c.q, c.k_pool, c.v_pool, c.batch, 0.3), c, 0.3, "op set")
    b = c.batch
    want = (b.block_tables, b.seq_lens, b.query_start, b.positions, 16, 9, 0.3)
    assert [n for n, _ in calls] == ["attention_prefill"], calls
    assert all(x is y or x == y for x, y in zip(calls[0][1], want, strict=True)), calls
    c = _case((1, 1), (20, 3), (4, 2, 32), 16, torch.float16, torch.float32, gen)
    attention(c.q, c.k_pool, c.v_pool, c.batch, 0.3)
    assert calls[1][0] == "attention_decode"


def test_flash_attention_rejects_bad_input() -> None:
    flash = _kernel()
    gen = torch.Generator(DEVICE).manual_seed(4)
    c = _case((3, 2), (0, 4), (4, 2, 32), 16, torch.float16, torch.float32, gen)
    q, k, v, bt, lens, qs, pos, bs, mq = c.args()

    z512 = torch.zeros(32, 2, 512, device=DEVICE)

    def call(**change):
        args = dict(
            q=q, k_pool=k, v_pool=v, block_tables=bt, seq_lens=lens, query_start=qs,
            positions=pos, block_size=bs, max_query_len=mq, scale=1.0,
        )  # fmt: skip
        flash.attention_prefill(**(args | change))

    for change, match in (
        ({"q": torch.zeros(5, 5, 32, device=DEVICE)}, "not a multiple"),
        ({"q": torch.zeros(5, 4, 64, device=DEVICE)}, "q has D=64, k_pool D=32"),
        ({"seq_lens": lens.int()}, "seq_lens must be int64"),
        ({"seq_lens": lens[:1]}, r"int64 \[B=2\]"),
        ({"query_start": qs[:2]}, r"query_start must be int64 \[B \+ 1 = 3\]"),
        ({"query_start": qs.int()}, "query_start must be int64"),
        ({"positions": pos[:4]}, r"positions must be int64 \[T=5\]"),
        ({"block_tables": bt.long()}, "int32"),
        ({"block_tables": bt.t().contiguous().t()}, "contiguous rows"),
        ({"block_size": 24}, "power of 2"),
        ({"block_size": 8}, "power of 2"),
        ({"k_pool": k[:24], "v_pool": v[:24]}, "whole number of blocks"),
        ({"v_pool": v.float()}, "one dtype"),
        ({"max_query_len": 0}, "max_query_len"),
        ({"max_query_len": 6}, "max_query_len"),
        ({"q": torch.zeros(5, 4, 512, device=DEVICE), "k_pool": z512, "v_pool": z512}, "up to"),
    ):
        with pytest.raises(AssertionError, match=match):
            call(**change)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import subprocess, tempfile
import torch
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime.jit import JITFunction
from kiln.kernels.flash_attention import attention_prefill
from tests.kernels.sm90 import compile_only

def run(h, hkv, d, dt, qdt=torch.float32, dv=None, bs=64, b=1, t=512, pdl=False):
    dv = dv or d
    k = torch.zeros(4096, hkv, d, dtype=dt)
    v = torch.zeros(4096, hkv, dv, dtype=dt)
    tables = torch.zeros(b, 4096 // bs, dtype=torch.int32)
    attention_prefill(
        torch.zeros(t, h, d, dtype=qdt), k, v, tables, torch.full((b,), t),
        torch.zeros(b + 1, dtype=torch.int64), torch.zeros(t, dtype=torch.int64), bs, t,
        d ** -0.5, pdl=pdl,
    )

ptx = []
with compile_only() as done:
    compile_instead = JITFunction.run
    def keep_ptx(self, *args, **kwargs):
        kernel = compile_instead(self, *args, **kwargs)
        ptx.append(kernel.asm["ptx"])
        return kernel
    JITFunction.run = keep_ptx
    try:
        run(32, 8, 128, torch.bfloat16)  # qwen3-8b, llama3-8b (first: its registers are checked)
        run(32, 8, 128, torch.float16)
        run(16, 8, 128, torch.bfloat16, qdt=torch.bfloat16)  # qwen3-0.6b, bf16 activations
        run(32, 4, 128, torch.float16, qdt=torch.float16, b=8)  # group 8, a batch of 8
        run(9, 3, 64, torch.float16)  # SmolLM2: group 3
        run(8, 2, 80, torch.bfloat16, dv=48)  # masked head sizes, Dv != D
        run(16, 8, 256, torch.bfloat16)  # the largest head size
        run(16, 8, 256, torch.float16, dv=128)
        run(32, 8, 128, torch.bfloat16, bs=16)  # steps capped at the block size
        run(32, 8, 128, torch.bfloat16, bs=128, pdl=True)
        run(32, 8, 128, torch.float32)  # fp32 cache: CUDA cores (tests)
        from kiln.quant.kv import cache_type
        for kt, vt in (("q8_0", "q8_0"), ("q4_0", "q4_0")):  # -ctk/-ctv block types
            k = cache_type(kt).allocate(4096, 8, 128, torch.device("cpu"))
            v = cache_type(vt).allocate(4096, 8, 128, torch.device("cpu"))
            attention_prefill(
                torch.zeros(512, 32, 128), k, v, torch.zeros(1, 64, dtype=torch.int32),
                torch.full((1,), 512), torch.zeros(2, dtype=torch.int64),
                torch.zeros(512, dtype=torch.int64), 64, 512, 128 ** -0.5,
            )
    finally:
        JITFunction.run = compile_instead
for c, p in zip(done, ptx):
    print(c.kernel, c.cubin_bytes, c.shared_bytes, int("wgmma.mma_async" in p),
          int("mma.sync" in p), int(c.launch_pdl), int(c.waits))
with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
    f.write(ptx[0])
    f.flush()
    r = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                       capture_output=True, text=True, check=True)
print("ptxas", " ".join(r.stderr.split()))
"""


def test_flash_attention_compiles_for_sm90() -> None:
    """Every variant compiles for an H100 with the real compiler (no GPU needed): the 16-bit
    caches multiply on tensor cores (wgmma, Hopper's warpgroup MMA, in the PTX), every variant
    fits the 227 KB of shared memory a block may have, pdl launches wait for their inputs, and
    qwen3-8b's kernel (bf16, D = 128, the default 128 x 64 tile on 8 warps) spills no registers
    (ptxas -v; kiln/kernels/flash_attention.py, default_config)."""
    from kiln.kernels.flash_attention import SHARED_LIMIT

    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    rows = [line.split() for line in out.splitlines() if line.startswith("_flash")]
    assert len(rows) == 13, out
    for i, (_name, _cubin, shared, wgmma, mma, launch_pdl, waits) in enumerate(rows):
        assert int(shared) <= SHARED_LIMIT, f"variant {i}: {shared} B of shared memory\n{out}"
        want_tc = i < 10  # all but the fp32 cache (and the block types: TF32, as compiled)
        if i < 11:
            assert int(wgmma) == want_tc, f"variant {i}: wgmma={wgmma} mma.sync={mma}\n{out}"
        assert launch_pdl == waits == str(int(i == 9)), f"variant {i}: pdl\n{out}"
    # q (32 KB) + 3 K/V steps of 16 KB each (2 in flight) at D = 128, bf16
    assert int(rows[0][2]) >= 32768 + 3 * 2 * 64 * 128 * 2, out
    ptxas = out.splitlines()[-1]
    assert "0 bytes spill stores" in ptxas, ptxas
    print(out)

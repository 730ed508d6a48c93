"""kiln.kernels.attention.attention_decode (paged flash-decoding) against
kiln.ops.reference.attention_decode.

Every case is a batch of rows of different lengths in one launch (a length of 1, lengths at block
boundaries, ragged ones) whose sequences own shuffled blocks of one pool; table entries past a
sequence's blocks point at a spare block. Every pool row that holds no visible position (the
spare blocks, the tail of each sequence's last block, blocks nobody owns) is NaN: any read of one
shows up as NaN in the output. On the CPU this runs through Triton's interpreter on small pools
(~0.1-0.5 s a launch: few launches); on a GPU the same cases add real capacities and lengths and
CUDA-graph replays with new lengths and tables.

The bound of an output element of row b, head h (see ATTENTION_DECODE in tolerances.py):
    |y - r| <= atol + rtol * (1 + S_bh) * sum_i w_bhi |v_bi|
w: the reference softmax weights; S_bh = max_i scale * sum_d |q_bhd k_bid|, the largest magnitude
of the terms of a score: a relative error e of the score's terms moves the weights by up to 2 e S.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kiln.ops import reference
from kiln.quant.kv import QuantizedRows, cache_type
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import ATTENTION_DECODE, rotated_bound

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ids = {"ids": lambda d: str(d).removeprefix("torch.")}

# (H, Hkv, D): groups 1, 2, 3 (SmolLM2's 9/3), 4, 8; D = 32, 64, 80 (masked), 128.
HEADS = [(2, 2, 32), (4, 2, 64), (9, 3, 64), (8, 2, 80), (8, 1, 128)]
if CUDA:
    HEADS += [(16, 8, 128), (32, 8, 128), (32, 4, 128)]


def _kernel():
    from kiln.kernels import attention

    if not CUDA and not attention._INTERPRETED:
        pytest.fail(
            "no CUDA device, and the kernel was compiled, not interpreted: TRITON_INTERPRET must "
            "be unset or 1 here (tests/conftest.py sets 1 when unset)"
        )
    return attention


@dataclass
class Paged:
    """One batch over a paged pool: q [B, H, D], k_pool [S, Hkv, D], v_pool [S, Hkv, Dv],
    block_tables int32 [B, NB], seq_lens int64 [B], and the lengths on the host."""

    q: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    block_size: int
    lens: tuple[int, ...]

    def args(self) -> tuple:
        return (self.q, self.k_pool, self.v_pool, self.block_tables, self.seq_lens, self.block_size)


def _paged(
    h, hkv, d, lens, block_size, n_blocks, dtype, q_dtype, gen, q_scale=1.0, dv=None, spare=3
) -> Paged:
    """Sequence b owns ceil(lens[b] / block_size) blocks, drawn from a shuffled order of the pool's
    blocks (so neither a sequence's blocks nor the sequences are in pool order); its table row
    has n_blocks entries, those past its blocks pointing at a spare block. The pool has `spare`
    blocks nobody owns. Rows that hold no visible position are NaN."""
    dv = dv or d
    assert spare >= 1, "the table entries past a sequence's blocks point at a spare block"
    need = [-(-n // block_size) for n in lens]
    assert max(need) <= n_blocks, (lens, block_size, n_blocks)
    total = sum(need) + spare
    order = torch.randperm(total, generator=torch.Generator().manual_seed(sum(lens) + total))
    spare_block = int(order[-1])
    table = torch.full((len(lens), n_blocks), spare_block, dtype=torch.int32)
    visible = torch.zeros(total * block_size, dtype=torch.bool)
    first = 0
    for b, (n, m) in enumerate(zip(lens, need)):
        blocks = order[first : first + m]
        first += m
        table[b, :m] = blocks.to(torch.int32)
        rows = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        visible[rows] = True
    q = (q_scale * torch.randn(len(lens), h, d, generator=gen, device=DEVICE)).to(q_dtype)
    k = torch.randn(total * block_size, hkv, d, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(total * block_size, hkv, dv, generator=gen, device=DEVICE).to(dtype)
    hidden = ~visible.to(DEVICE)
    k[hidden] = float("nan")
    v[hidden] = float("nan")
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    return Paged(q, k, v, table.to(DEVICE), seq_lens, block_size, tuple(lens))


def _visible_rows(p: Paged, b: int) -> torch.Tensor:
    """Pool rows of sequence b's positions 0..lens[b]-1, computed on the host."""
    n = p.lens[b]
    blocks = p.block_tables[b].cpu().long()[: -(-n // p.block_size)]
    rows = (blocks[:, None] * p.block_size + torch.arange(p.block_size)).reshape(-1)[:n]
    return rows.to(p.k_pool.device)


def _products_dtype(p: Paged) -> torch.dtype | str:
    """The key of the kernel's arithmetic in ATTENTION_DECODE: the float pool's dtype, or
    "blocks as f16" where a q8_0 / q4_0 pool's values are rounded to f16 (two block types, or
    one beside an f16 pool: kiln/kernels/attention.py's Paged.products_dtype)."""
    pools = (p.k_pool, p.v_pool)
    floats = [t.dtype for t in pools if not isinstance(t, QuantizedRows)]
    if len(floats) == 2:
        return floats[0]
    assert floats in ([], [torch.float16]), "the tests pair block types with f16 pools only"
    return "blocks as f16"


def quantized(pool: torch.Tensor, kind: str) -> torch.Tensor | QuantizedRows:
    """A float pool [S, Hkv, D] in cache type `kind` (f16 stays a tensor); rows of NaN stay NaN
    when read back (their d is NaN), so a kernel that reads one still shows it."""
    kv = cache_type(kind)
    if not kv.quantized:
        return pool.to(kv.dtype)
    out = kv.allocate(pool.shape[0], pool.shape[1], pool.shape[2], pool.device)
    out.write(torch.arange(pool.shape[0], device=pool.device), pool)
    return out


def _compare(y, p: Paged, scale: float, what: str) -> None:
    """y [B, H, Dv] against the reference (which masks the NaN rows itself)."""
    ref = reference.attention_decode(*p.args(), scale)  # [B, H, Dv]
    assert bool(torch.isfinite(ref).all()), f"{what}: the reference read a hidden (NaN) row"
    group = p.q.shape[1] // p.k_pool.shape[1]
    bounds = []
    for b in range(len(p.lens)):
        rows = _visible_rows(p, b)
        kf = p.k_pool[rows].float().repeat_interleave(group, dim=1)  # [L, H, D]
        vf = p.v_pool[rows].float().repeat_interleave(group, dim=1)
        qf = p.q[b].float()  # [H, D]
        w = torch.softmax(scale * torch.einsum("hd,lhd->hl", qf, kf), dim=-1)  # [H, L]
        terms = scale * torch.einsum("hd,lhd->hl", qf.abs(), kf.abs()).amax(dim=-1)  # S: [H]
        mag = torch.einsum("hl,lhd->hd", w, vf.abs())  # [H, Dv]
        rtol, atol, _reason = ATTENTION_DECODE[_products_dtype(p)]
        bound = atol + rtol * (1 + terms[:, None]) * mag
        if getattr(p.v_pool, "rotated", False):  # the output rotated back (both sides)
            bound = rotated_bound(bound, mag)
        bounds.append(bound)
    _check(y, ref, torch.stack(bounds), f"{what} lens={p.lens} bs={p.block_size}")


def _cases(attention) -> list[tuple[tuple[int, ...], int, int, object]]:
    """(lengths, block_size, blocks per table row, config), one launch each. The CPU gets four:
    every block size 16..128, B = 1, 2, 3, 8, lengths 1 and block_size - 1 / block_size /
    block_size + 1, lengths of one and of several slices (the default config splits a 320-row
    table into 2 slices of up to 256 keys; `small` into up to 10 of at least 32, several idle at
    short lengths), and block_s below, equal to and capped at the block size."""
    small = attention.AttentionConfig(block_s=16, min_slice=32, programs=16)
    cases = [
        ((300, 15, 17), 16, 20, small),
        ((1, 31, 32, 33, 300, 64, 257, 2), 32, 10, None),
        ((300,), 64, 5, None),
        ((255, 128), 128, 3, small),
    ]
    if CUDA:
        cases += [
            (lens, bs, nb, cfg)
            for lens, bs, nb in (
                ((4096,), 64, 64),
                ((1000, 4096, 1), 16, 256),
                ((32768, 128, 1, 40960), 64, 640),
                ((1, 63, 64, 65, 5000, 8191, 129, 40000), 128, 320),
                ((32768,), 32, 1280),
            )
            for cfg in (None, small)
        ]
    return cases


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
@pytest.mark.parametrize("heads", HEADS, ids=lambda t: "H{}_Hkv{}_D{}".format(*t))
def test_attention_decode_matches_reference(heads, dtype) -> None:
    """On the CPU each (heads, dtype) runs half of the cases, alternating, so that every case
    still meets every head shape and every dtype (the interpreter takes ~0.5 s a launch)."""
    attention = _kernel()
    h, hkv, d = heads
    scale = d**-0.5
    gen = torch.Generator(DEVICE).manual_seed(h * 1000 + d)
    cases = _cases(attention)
    if not CUDA:
        parity = (HEADS.index(heads) + DTYPES.index(dtype)) % 2
        cases = cases[parity::2]
    for lens, bs, nb, cfg in cases:
        p = _paged(h, hkv, d, lens, bs, nb, dtype, torch.float32, gen)
        y = attention.attention_decode(*p.args(), scale, cfg)
        _compare(y, p, scale, f"{heads} {dtype} {cfg}")


@pytest.mark.parametrize("kv", (("q8_0", "q8_0"), ("q4_0", "q8_0"), ("f16", "q4_0")))
def test_attention_decode_reads_quantized_pools(kv) -> None:
    """-ctk/-ctv q8_0 and q4_0: the kernel dequantizes the blocks of the rows it reads and
    multiplies their values rounded to f16 (the reference: the exact dequantized values); an
    f16 pool beside a block type. Head size 64: rows stored rotated, so the output is rotated
    back (V_ROT: in the kernel's epilogue). Hidden rows (NaN) are never read."""
    attention = _kernel()
    h, hkv, d = 8, 2, 64
    gen = torch.Generator(DEVICE).manual_seed(len(kv[0]) * 7 + len(kv[1]))
    cases = _cases(attention)
    for lens, bs, nb, cfg in cases if CUDA else cases[:2]:
        p = _paged(h, hkv, d, lens, bs, nb, torch.float32, torch.float32, gen)
        p = dataclasses.replace(
            p, k_pool=quantized(p.k_pool, kv[0]), v_pool=quantized(p.v_pool, kv[1])
        )
        y = attention.attention_decode(*p.args(), d**-0.5, cfg)
        _compare(y, p, d**-0.5, f"K {kv[0]} V {kv[1]} {cfg}")


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
def test_attention_decode_peaked_softmax_and_q_dtypes(dtype) -> None:
    """Large scores (q * 8: a few keys take nearly all the weight, so the running max moves
    between steps and slices), q in f16/bf16 (the activation dtypes), Dv != D."""
    attention = _kernel()
    small = attention.AttentionConfig(block_s=16, min_slice=32, programs=16)
    h, hkv, d = 8, 2, 64
    gen = torch.Generator(DEVICE).manual_seed(5)
    q_dtype = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}.get(dtype, dtype)
    for lens, q_scale, qdt, dv, cfg in (
        ((150, 7), 8.0, torch.float32, d, small),
        ((7, 1, 40), 8.0, q_dtype, d, None),
        ((40, 1), 1.0, torch.float32, 48, small),
    ):
        p = _paged(h, hkv, d, lens, 16, 13, dtype, qdt, gen, q_scale, dv)
        y = attention.attention_decode(*p.args(), d**-0.5, cfg)
        _compare(y, p, d**-0.5, f"q:{qdt} x{q_scale} Dv={dv} {cfg}")


def _refill(dst: Paged, src: Paged) -> None:
    """Copy src's lengths, tables and pool contents into dst's tensors (same shapes)."""
    for a, b in ((dst.q, src.q), (dst.k_pool, src.k_pool), (dst.v_pool, src.v_pool)):
        a.copy_(b)
    dst.block_tables.copy_(src.block_tables)
    dst.seq_lens.copy_(src.seq_lens)
    dst.lens = src.lens


def test_attention_decode_reads_lengths_and_tables_on_the_device() -> None:
    """One set of launch arguments serves every length and table: only the values in seq_lens,
    block_tables and the pools change (as in a replayed CUDA graph), and every output follows.
    The tables are a [:B, :NB] view of a larger buffer (a row stride past NB), as a runtime may
    keep one table for its largest batch and context."""
    attention = _kernel()
    h, hkv, d, bs, nb = 4, 2, 32, 16, 6
    gen = torch.Generator(DEVICE).manual_seed(9)
    cfg = attention.AttentionConfig(block_s=16, min_slice=16, programs=8)
    cases = ((96, 1, 16), (17, 33, 95), (1, 1, 2), (48, 48, 16), (32, 16, 64))
    total = max(sum(-(-n // bs) for n in lens) for lens in cases) + 1  # one pool size for all
    live = None
    for lens in cases:
        spare = total - sum(-(-n // bs) for n in lens)
        p = _paged(h, hkv, d, lens, bs, nb, torch.float16, torch.float32, gen, spare=spare)
        if live is None:
            big = torch.full((5, nb + 3), -1, dtype=torch.int32, device=DEVICE)
            live = Paged(*p.args()[:3], big[: len(lens), :nb], p.seq_lens.clone(), bs, p.lens)
        _refill(live, p)
        y = attention.attention_decode(*live.args(), 0.2, cfg)
        _compare(y, live, 0.2, "device-read")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_attention_decode_cuda_graph_replay() -> None:
    """Captured once at B = 3 over a 128-block table; replayed with new lengths, tables and
    pools written into the captured tensors."""
    from kiln.kernels import attention

    h, hkv, d, bs, nb = 32, 8, 128, 64, 128
    gen = torch.Generator(DEVICE).manual_seed(11)
    cases = ((1, 1, 1), (255, 256, 257), (8192, 5000, 64), (63, 8192, 1), (4097, 4096, 4095))
    total = max(sum(-(-n // bs) for n in lens) for lens in cases) + 1

    def case(lens):
        spare = total - sum(-(-n // bs) for n in lens)
        return _paged(h, hkv, d, lens, bs, nb, torch.bfloat16, torch.float32, gen, spare=spare)

    live = case(cases[0])
    attention.attention_decode(*live.args(), d**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = attention.attention_decode(*live.args(), d**-0.5)
    for lens in cases[1:] + cases[:1]:
        _refill(live, case(lens))
        graph.replay()
        torch.cuda.synchronize()
        _compare(y, live, d**-0.5, "graph replay")


def test_attention_decode_rejects_bad_input() -> None:
    attention = _kernel()
    q = torch.zeros(2, 4, 32, device=DEVICE)
    k = torch.zeros(32, 2, 32, device=DEVICE)
    bt = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    n = torch.tensor([3, 5], device=DEVICE)
    with pytest.raises(AssertionError, match="not a multiple"):
        attention.attention_decode(torch.zeros(2, 5, 32, device=DEVICE), k, k, bt, n, 16, 1.0)
    with pytest.raises(AssertionError, match="q has D=32"):
        attention.attention_decode(q, torch.zeros(32, 2, 64, device=DEVICE), k, bt, n, 16, 1.0)
    with pytest.raises(AssertionError, match="int64"):
        attention.attention_decode(q, k, k, bt, n.int(), 16, 1.0)
    with pytest.raises(AssertionError, match=r"int64 \[B=2\]"):
        attention.attention_decode(q, k, k, bt, n[:1], 16, 1.0)
    with pytest.raises(AssertionError, match="int32"):
        attention.attention_decode(q, k, k, bt.long(), n, 16, 1.0)
    with pytest.raises(AssertionError, match="contiguous rows"):
        attention.attention_decode(q, k, k, bt.t().contiguous().t(), n, 16, 1.0)
    with pytest.raises(AssertionError, match=r"\[B=2, NB\]"):
        attention.attention_decode(q, k, k, bt[:1], n, 16, 1.0)
    with pytest.raises(AssertionError, match="power of 2"):
        attention.attention_decode(q, k, k, bt, n, 24, 1.0)
    with pytest.raises(AssertionError, match="power of 2"):
        attention.attention_decode(q, k, k, bt, n, 8, 1.0)
    with pytest.raises(AssertionError, match="whole number of blocks"):
        attention.attention_decode(q, k[:24], k[:24], bt, n, 16, 1.0)
    with pytest.raises(AssertionError, match="one dtype"):
        attention.attention_decode(q, k, k.half(), bt, n, 16, 1.0)
    with pytest.raises(AssertionError, match="contiguous"):
        spread = k.transpose(0, 1).contiguous().transpose(0, 1)
        attention.attention_decode(q, spread, k, bt, n, 16, 1.0)


def test_reference_attention_decode_ignores_what_is_masked() -> None:
    """The oracle itself: the reference equals plain softmax attention over each sequence's keys
    gathered by hand (position by position, not through its block arithmetic), whatever the
    NaN rows and the table entries past a sequence's blocks hold."""
    gen = torch.Generator(DEVICE).manual_seed(13)
    h, hkv, d, bs = 6, 2, 16, 16
    p = _paged(h, hkv, d, (1, 16, 17, 40), bs, 4, torch.float32, torch.float32, gen)
    y = reference.attention_decode(*p.args(), 0.3)
    table = p.block_tables.cpu()
    for b, n in enumerate(p.lens):
        rows = [int(table[b, j // bs]) * bs + j % bs for j in range(n)]
        k = p.k_pool[rows].repeat_interleave(h // hkv, dim=1)  # [L, H, D]
        v = p.v_pool[rows].repeat_interleave(h // hkv, dim=1)
        w = torch.softmax(0.3 * torch.einsum("hd,lhd->hl", p.q[b], k), dim=-1)
        want = torch.einsum("hl,lhd->hd", w, v)
        torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-6)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from kiln.kernels.attention import attention_decode
from tests.kernels.sm90 import compile_only

# (H, Hkv, D): qwen3-0.6b, qwen3-8b / llama3-8b, qwen3-30b-a3b, SmolLM2 (group 3), D = 80.
HEADS = ((16, 8, 128), (32, 8, 128), (32, 4, 128), (9, 3, 64), (8, 2, 80))

def run(h, hkv, d, dt, qdt=torch.float32, bs=64, b=1):
    k = torch.zeros(40960, hkv, d, dtype=dt)
    tables = torch.zeros(b, 40960 // bs, dtype=torch.int32)
    n = torch.full((b,), 5)
    attention_decode(torch.zeros(b, h, d, dtype=qdt), k, k, tables, n, bs, d ** -0.5)

with compile_only() as done:
    for dt in (torch.float16, torch.bfloat16):
        for h, hkv, d in HEADS:
            run(h, hkv, d, dt)
    run(32, 8, 128, torch.float32)
    run(32, 8, 128, torch.bfloat16, torch.float16)  # q in an activation dtype
    run(32, 8, 128, torch.float16, torch.bfloat16)
    for bs in (16, 32, 128):  # block_s capped at 16 and 32; 128: steps of 64 inside a block
        run(32, 8, 128, torch.float16, bs=bs)
    run(32, 8, 128, torch.bfloat16, b=8)
    # block-type pools (-ctk/-ctv q8_0, q4_0, and one beside f16)
    from kiln.quant.kv import cache_type
    tables = torch.zeros(1, 40960 // 64, dtype=torch.int32)
    q = torch.zeros(1, 32, 128)
    for kt, vt in (("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")):
        k = cache_type(kt).allocate(40960, 8, 128, torch.device("cpu"))
        v = cache_type(vt).allocate(40960, 8, 128, torch.device("cpu"))
        attention_decode(q, k, v, tables, torch.full((1,), 5), 64, 128 ** -0.5)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_attention_kernels_compile_for_sm90() -> None:
    """Every launched variant compiles for an H100 with the real compiler (no GPU needed), and
    the default config keeps two K/V steps in flight despite the block-table load in front of
    them (kiln/kernels/attention.py, _triton_stages): at D = 128, f16, block_s 64 that is two K
    and two V tiles of 16 KB in shared memory, where a single-buffered loop has one of each."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    lines = [line.split() for line in out.splitlines() if line.strip()]
    names = [line[0] for line in lines]
    assert names.count("_attention_decode_kernel") == 20, out
    assert names.count("_attention_decode_combine_kernel") == 20, out  # one per launch
    shared = [int(line[2]) for line in lines if line[0] == "_attention_decode_kernel"]
    assert shared[1] >= 4 * 64 * 128 * 2, f"qwen3-8b f16: K/V not double-buffered\n{out}"
    print(out)


_COMPILE_FIT_WAVE = """
import sys
sys.path.insert(0, {root!r})
import torch
from kiln.kernels.attention import AttentionConfig, attention_decode
from kiln.quant.kv import cache_type
from tests.kernels.sm90 import compile_only

tables = torch.zeros(1, 40960 // 64, dtype=torch.int32)
q = torch.zeros(1, 32, 128)
with compile_only() as done:
    for kind in ("f16", "q8_0"):
        for fit in (False, True):
            k = cache_type(kind).allocate(40960, 8, 128, torch.device("cpu"))
            cfg = AttentionConfig(programs=4 * 132, fit_wave=fit)
            attention_decode(q, k, k, tables, torch.full((1,), 5), 64, 128 ** -0.5, cfg)
for c in done:
    if c.kernel == "_attention_decode_kernel":
        print(c.maxnreg)
"""


def test_fit_wave_caps_the_registers_so_that_every_program_is_resident():
    """4 programs of 4 warps an SM share its 65536 registers: 128 a thread (the compiler's own
    choice at D = 128 is 146 for f16 and 147 for q8_0, 3 programs an SM); the cap reaches ptxas
    as the PTX's .maxnreg only where the config asks for it."""
    att = _kernel()
    cfg = att.AttentionConfig(programs=4 * 132)
    assert att.wave_registers(cfg, 132) == 128
    assert att.wave_registers(dataclasses.replace(cfg, programs=3 * 132), 132) == 168
    assert att.wave_registers(dataclasses.replace(cfg, programs=2 * 132), 132) == 255
    assert att.wave_registers(dataclasses.replace(cfg, programs=8 * 132, num_warps=8), 132) == 64
    assert att.wave_launch(cfg, torch.device("cpu")) == {}  # off by default
    out = run_compile_check(_COMPILE_FIT_WAVE.format(root=str(ROOT)))
    assert out.split() == ["None", "128", "None", "128"], out

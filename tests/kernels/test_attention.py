"""kiln.kernels.attention.attention_decode against kiln.ops.reference.attention_decode.

On the CPU this runs through Triton's interpreter on small caches; on a GPU the same cases add
real shapes (C up to 40960, length up to 32768) and a CUDA-graph replay over several lengths.
Cache rows at or past `length` hold NaN: any read of them shows up as NaN in the output.

The bound of an output element of head h (see ATTENTION_DECODE in tolerances.py):
    |y - r| <= atol + rtol * (1 + S_h) * sum_i w_hi |v_i|
w: the reference softmax weights; S_h = max_i scale * sum_d |q_hd k_id|, the largest magnitude of
the terms of a score: a relative error e of the score's terms moves the weights by up to 2 e S_h.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.ops import reference
from tests.kernels.sm90 import run_compile_check
from tests.kernels.test_matvec import _check
from tests.kernels.tolerances import ATTENTION_DECODE

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


def _cases(attention) -> list[tuple[int, int, object]]:
    """(C, length, config): the default config (a 320-row cache is 2 slices of up to 256 keys;
    length 17 is one ragged block) and small slices (block_s 16, at least 32 keys per slice: 10
    slices, several of them idle at short lengths). The interpreter runs ~0.5 s a launch, so the
    CPU gets few; a GPU adds real capacities and lengths."""
    small = attention.AttentionConfig(block_s=16, min_slice=32, programs=64)
    cases = [(320, 300, small), (320, 17, None), (300, 300, None), (320, 2, small)]
    if CUDA:
        cases += [
            (c, n, cfg)
            for c, n in ((4096, 4096), (4096, 1000), (40960, 32768), (40960, 128), (40960, 1))
            for cfg in (None, small)
        ]
    return cases


def _inputs(h, hkv, d, c, length, dtype, q_dtype, gen, q_scale=1.0, dv=None):
    """q [1, H, D], caches [C, Hkv, D] and [C, Hkv, Dv] with NaN in rows >= length, length int64
    [1]."""
    q = (q_scale * torch.randn(1, h, d, generator=gen, device=DEVICE)).to(q_dtype)
    k = torch.randn(c, hkv, d, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(c, hkv, dv or d, generator=gen, device=DEVICE).to(dtype)
    k[length:] = float("nan")
    v[length:] = float("nan")
    return q, k, v, torch.tensor([length], device=DEVICE)


def _compare(y, q, k, v, length: int, scale: float, what: str) -> None:
    """y against the reference on the valid rows (the NaN rows would poison torch's SDPA)."""
    kv, vv = k[:length], v[:length]
    n = torch.tensor([length], device=q.device)
    ref = reference.attention_decode(q, kv, vv, n, scale)  # [1, H, Dv]
    group = q.shape[1] // k.shape[1]
    kf = kv.float().repeat_interleave(group, dim=1)  # [L, H, D]
    vf = vv.float().repeat_interleave(group, dim=1)
    qf = q.float()[0]  # [H, D]
    w = torch.softmax(scale * torch.einsum("hd,lhd->hl", qf, kf), dim=-1)  # [H, L]
    terms = scale * torch.einsum("hd,lhd->hl", qf.abs(), kf.abs()).amax(dim=-1)  # S_h: [H]
    mag = torch.einsum("hl,lhd->hd", w, vf.abs())  # [H, Dv]
    rtol, atol, _reason = ATTENTION_DECODE[k.dtype]
    bound = atol + rtol * (1 + terms[:, None]) * mag
    _check(y, ref, bound[None], what)


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
@pytest.mark.parametrize("heads", HEADS, ids=lambda t: "H{}_Hkv{}_D{}".format(*t))
def test_attention_decode_matches_reference(heads, dtype) -> None:
    attention = _kernel()
    h, hkv, d = heads
    scale = d**-0.5
    gen = torch.Generator(DEVICE).manual_seed(h * 1000 + d)
    for c, length, cfg in _cases(attention):
        q, k, v, n = _inputs(h, hkv, d, c, length, dtype, torch.float32, gen)
        y = attention.attention_decode(q, k, v, n, scale, cfg)
        _compare(y, q, k, v, length, scale, f"{heads} {dtype} C={c} L={length} {cfg}")


@pytest.mark.parametrize("dtype", DTYPES, **_ids)
def test_attention_decode_peaked_softmax_and_q_dtypes(dtype) -> None:
    """Large scores (q * 8: a few keys take nearly all the weight, so the running max moves
    between blocks and slices), length 1, q in f16/bf16 (the activation dtypes), Dv != D."""
    attention = _kernel()
    small = attention.AttentionConfig(block_s=16, min_slice=32, programs=64)
    h, hkv, d, c = 8, 2, 64, 200
    gen = torch.Generator(DEVICE).manual_seed(5)
    q_dtype = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}.get(dtype, dtype)
    for length, q_scale, qdt, dv, cfg in (
        (150, 8.0, torch.float32, d, small),
        (7, 8.0, q_dtype, d, None),
        (1, 1.0, q_dtype, d, small),
        (40, 1.0, torch.float32, 48, small),
    ):
        q, k, v, n = _inputs(h, hkv, d, c, length, dtype, qdt, gen, q_scale, dv)
        y = attention.attention_decode(q, k, v, n, d**-0.5, cfg)
        _compare(y, q, k, v, length, d**-0.5, f"q:{qdt} x{q_scale} L={length} {cfg}")


def test_attention_decode_reads_length_on_the_device() -> None:
    """One set of launch arguments serves every length: only the value in `length` changes
    (as in a replayed CUDA graph), and every output follows it."""
    attention = _kernel()
    h, hkv, d, c = 4, 2, 32, 96
    gen = torch.Generator(DEVICE).manual_seed(9)
    q, k, v, n = _inputs(h, hkv, d, c, c, torch.float16, torch.float32, gen)
    cfg = attention.AttentionConfig(block_s=16, min_slice=16, programs=8)
    for length in (1, 16, 17, 33, 95, 96):
        n.fill_(length)
        y = attention.attention_decode(q, k, v, n, 0.2, cfg)
        _compare(y, q, k, v, length, 0.2, f"L={length}")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_attention_decode_cuda_graph_replay() -> None:
    from kiln.kernels import attention

    h, hkv, d, c = 32, 8, 128, 8192
    gen = torch.Generator(DEVICE).manual_seed(11)
    q, k, v, n = _inputs(h, hkv, d, c, c, torch.bfloat16, torch.float32, gen)
    n.fill_(1)
    attention.attention_decode(q, k, v, n, d**-0.5)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = attention.attention_decode(q, k, v, n, d**-0.5)
    for length in (1, 255, 256, 257, 5000, 8192):
        n.fill_(length)
        graph.replay()
        torch.cuda.synchronize()
        _compare(y, q, k, v, length, d**-0.5, f"graph replay L={length}")


def test_attention_decode_rejects_bad_input() -> None:
    attention = _kernel()
    q = torch.zeros(1, 4, 32, device=DEVICE)
    k = torch.zeros(16, 2, 32, device=DEVICE)
    n = torch.tensor([3], device=DEVICE)
    with pytest.raises(AssertionError, match="not a multiple"):
        attention.attention_decode(torch.zeros(1, 5, 32, device=DEVICE), k, k, n, 1.0)
    with pytest.raises(AssertionError, match="q has D=32"):
        attention.attention_decode(q, torch.zeros(16, 2, 64, device=DEVICE), k, n, 1.0)
    with pytest.raises(AssertionError, match="int64"):
        attention.attention_decode(q, k, k, n.int(), 1.0)
    with pytest.raises(AssertionError, match="one dtype"):
        attention.attention_decode(q, k, k.half(), n, 1.0)
    with pytest.raises(AssertionError, match="contiguous"):
        attention.attention_decode(q, k.transpose(0, 1).contiguous().transpose(0, 1), k, n, 1.0)


_COMPILE = """
import sys
sys.path.insert(0, {root!r})
import torch
from kiln.kernels.attention import attention_decode
from tests.kernels.sm90 import compile_only

# (H, Hkv, D): qwen3-0.6b, qwen3-8b / llama3-8b, qwen3-30b-a3b, SmolLM2 (group 3), D = 80.
HEADS = ((16, 8, 128), (32, 8, 128), (32, 4, 128), (9, 3, 64), (8, 2, 80))
n = torch.tensor([5])

def run(h, hkv, d, dt, qdt=torch.float32):
    k = torch.zeros(40960, hkv, d, dtype=dt)
    attention_decode(torch.zeros(1, h, d, dtype=qdt), k, k, n, d ** -0.5)

with compile_only() as done:
    for dt in (torch.float16, torch.bfloat16):
        for h, hkv, d in HEADS:
            run(h, hkv, d, dt)
    run(32, 8, 128, torch.float32)
    run(32, 8, 128, torch.bfloat16, torch.float16)  # q in an activation dtype
    run(32, 8, 128, torch.float16, torch.bfloat16)
for c in done:
    print(c.kernel, c.cubin_bytes, c.shared_bytes)
"""


def test_attention_kernels_compile_for_sm90() -> None:
    """Every launched variant compiles for an H100 with the real compiler (no GPU needed)."""
    out = run_compile_check(_COMPILE.format(root=str(ROOT)))
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.count("_attention_decode_kernel") == 13, out
    assert names.count("_attention_decode_combine_kernel") == 13, out  # one per launch
    print(out)

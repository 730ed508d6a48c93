"""KV-cache types (kiln/quant/kv.py): K/V rows quantized as written bit-exact against the gguf
package's quantizers (ggml's quantize_row_q8_0 / q4_0_ref), read back as gguf dequantizes them;
the row protocol of a quantized pool (select, copy, write at slots); sizes; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from kiln.errors import UsageError
from kiln.limits import kv_cache_bytes
from kiln.quant.kv import (
    CACHE_TYPES,
    QuantizedRows,
    cache_type,
    from_split,
    hadamard,
    rotate,
    rotation,
    write_rows,
)

BLOCK_TYPES = ("q8_0", "q4_0")
CPU = torch.device("cpu")


def _rows(gen: torch.Generator, t: int, heads: int, d: int) -> torch.Tensor:
    """float32 [t, heads, d]: normal values, with the cases a quantizer gets wrong: a zero
    block, a block of one repeated value, a block whose largest magnitude is negative, ties at
    half a step, huge and tiny scales."""
    x = torch.randn(t, heads, d, generator=gen)
    x[0, 0, :32] = 0.0
    x[0, -1, :32] = 0.75
    x[1 % t, 0, 5] = -9.0
    x[-1, 0, :32] = torch.arange(32) * 0.5 - 8.0  # q4_0 steps of 1: values on half steps
    x[-1, -1, -32:] *= 1e4
    if d > 32:
        x[-1, -1, :32] *= 1e-6
    return x


@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize(("heads", "d"), [(1, 32), (2, 64), (3, 128), (1, 96)])
def test_written_rows_are_ggmls_blocks_split_and_read_back_as_gguf_dequantizes(name, heads, d):
    """A head's row holds ggml's blocks' bytes split: the D / 32 scales, then the quants."""
    kind = CACHE_TYPES[name]
    gen = torch.Generator().manual_seed(d + heads)
    x = _rows(gen, 5, heads, d)
    pool = kind.allocate(12, heads, d, CPU)
    assert isinstance(pool, QuantizedRows) and pool.shape == (12, heads, d)
    slots = torch.tensor([7, 2, 11, 0, 4])
    write_rows(pool, slots, x)
    assert pool.rotated == (d % 64 == 0)  # stored rotated where the head size allows
    stored = rotate(x) if pool.rotated else x
    expect = quants.quantize(stored.numpy(), kind.qtype)  # uint8 [5, heads, row_bytes]
    blocks = expect.reshape(5, heads, d // 32, -1)
    split = np.concatenate([blocks[..., :2].reshape(5, heads, -1),
                            blocks[..., 2:].reshape(5, heads, -1)], axis=-1)  # fmt: skip
    assert np.array_equal(pool.data[slots].numpy(), split)
    assert np.array_equal(from_split(pool.data[slots], kind).numpy(), expect)
    back = pool.index_select(0, slots).float()
    assert back.dtype == torch.float32 and back.shape == (5, heads, d)
    assert np.array_equal(back.numpy(), quants.dequantize(expect, kind.qtype))
    assert torch.equal(pool[slots].float(), back) and torch.equal(pool[2:3].float(), back[1:2])
    untouched = [r for r in range(12) if r not in slots.tolist()]
    assert not pool.data[untouched].any()


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_a_strided_view_of_a_merged_result_quantizes_as_its_copy(name):
    """The ops write K and V as views of the merged QKV result (non-contiguous rows)."""
    qkv = torch.randn(3, 4 * 64, generator=torch.Generator().manual_seed(1))
    v = qkv[:, 2 * 64 :].view(3, 2, 64)
    a, b = CACHE_TYPES[name].allocate(3, 2, 64, CPU), CACHE_TYPES[name].allocate(3, 2, 64, CPU)
    write_rows(a, torch.arange(3), v)
    write_rows(b, torch.arange(3), v.contiguous())
    assert torch.equal(a.data, b.data)


def test_rotation_is_llama_cpps_and_llama_attn_rot_disable_turns_it_off(monkeypatch):
    """The rotation (llama.cpp's since April 2026): Sylvester's Hadamard matrix of 64 / 8 on
    each 64 values, orthonormal, symmetric, its own inverse, so q.k and a weighted sum of V rows
    survive it; block types only, head sizes multiple of 64; LLAMA_ATTN_ROT_DISABLE=1 off."""
    h = hadamard(CPU)
    assert (
        h.shape == (64, 64) and torch.equal(h, h.T) and set(h.unique().tolist()) == {-0.125, 0.125}
    )
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)
    assert torch.equal(h[1, :4], torch.tensor([0.125, -0.125, 0.125, -0.125]))  # Sylvester order
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(3, 128, generator=gen), torch.randn(3, 128, generator=gen)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4)
    assert torch.allclose(rotate(rotate(q)), q, atol=1e-6)
    for name, d, want in [("q8_0", 64, True), ("q4_0", 128, True), ("q8_0", 96, False),
                          ("q8_0", 32, False), ("f16", 64, False)]:  # fmt: skip
        assert rotation(CACHE_TYPES[name], d) == want, (name, d)
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    assert not rotation(CACHE_TYPES["q4_0"], 128)
    assert not CACHE_TYPES["q4_0"].allocate(2, 1, 128, CPU).rotated
    # a rotated pool's rows quantize rotate(x); its float() gives them rotated
    monkeypatch.delenv("LLAMA_ATTN_ROT_DISABLE")
    pool = CACHE_TYPES["q8_0"].allocate(3, 1, 64, CPU)
    x = torch.randn(3, 1, 64, generator=gen)
    pool.write(torch.arange(3), x)
    assert torch.allclose(rotate(pool.float()), x, atol=2 * x.abs().amax().item() / 127)


def test_float_types_store_the_dtype_and_block_pools_copy_rows():
    x = torch.randn(2, 2, 32)
    for name in ("f32", "f16", "bf16"):
        pool = CACHE_TYPES[name].allocate(4, 2, 32, CPU)
        write_rows(pool, torch.tensor([3, 1]), x)
        assert pool.dtype == CACHE_TYPES[name].dtype
        assert torch.equal(pool[3], x[0].to(pool.dtype))
    pool = CACHE_TYPES["q8_0"].allocate(4, 2, 32, CPU)
    write_rows(pool, torch.tensor([0, 1]), x)
    pool[2:4] = pool[0:2]  # the pool's growth and copy-on-write copy rows like this
    assert torch.equal(pool.data[2:4], pool.data[0:2])
    with pytest.raises(AssertionError, match="another cache type"):
        pool[0:1] = CACHE_TYPES["q4_0"].allocate(1, 2, 32, CPU)


def test_bytes_per_token_follow_the_block_layouts():
    config = type("C", (), dict(n_layer=3, n_head_kv=2, head_dim=64, head_dim_v=64))
    per_head = {"f32": 256, "f16": 128, "bf16": 128, "q8_0": 2 * 34, "q4_0": 2 * 18}
    for name, b in per_head.items():
        assert CACHE_TYPES[name].row_bytes(64) == b
        assert kv_cache_bytes(config, 10, name) == 10 * 3 * 2 * 2 * b
    assert kv_cache_bytes(config, 1, "q8_0", "q4_0") == 3 * 2 * (68 + 36)
    assert kv_cache_bytes(config, 1, torch.float16) == kv_cache_bytes(config, 1, "f16")


def test_names_and_errors():
    assert cache_type("Q8_0") is CACHE_TYPES["q8_0"] and cache_type(torch.float16).name == "f16"
    with pytest.raises(UsageError, match=r"unknown cache type 'q5_k': use one of f32, f16, bf16"):
        cache_type("q5_k")
    with pytest.raises(UsageError, match="K head size is 8: use a K cache type of f32, f16, bf16"):
        CACHE_TYPES["q4_0"].check_head_dim(8, "K")
    CACHE_TYPES["q4_0"].check_head_dim(96, "V")

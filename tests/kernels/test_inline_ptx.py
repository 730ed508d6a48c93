"""The inline PTX of the quant domain's Q4_K unpack (kernels/triton/dequant.py
`_nibbles_of_words`) run by a small PTX emulator: compiled kernels take this branch and Triton's
interpreter never does (it runs `_magic_bf16` on the bytes), so without a GPU this is what checks
that each output holds 128 + the nibble of the byte the kernel's join puts it at."""

from __future__ import annotations

import inspect
import re

import numpy as np

from kiln.kernels.triton import dequant

MASK = np.uint64(0xFFFFFFFF)


def _asm_of(fn) -> str:
    """The PTX string of the function's tl.inline_asm_elementwise call."""
    source = inspect.getsource(fn.fn)  # fn: the JITFunction (or the interpreter's wrapper)
    m = re.search(r'inline_asm_elementwise\(\s*"""(.*?)"""', source, re.S)
    assert m, f"no inline asm found in {fn.__name__}"
    return m.group(1)


def _prmt(a, b, sel: int):
    """prmt.b32 (default mode): result byte i is byte (sel >> 4i) & 7 of {b, a}, or that byte's
    sign replicated when bit 3 of the selector nibble is set."""
    pool = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(pool)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (pool >> np.uint64(8 * (s & 7))) & np.uint64(0xFF)
        if s & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * i)
    return out & MASK


def _lop3(a, b, c, lut: int):
    """lop3.b32: bit k of the result is bit (a_k << 2 | b_k << 1 | c_k) of the LUT."""
    out = np.zeros_like(a)
    for idx in range(8):
        if lut >> idx & 1:
            pick = [x if (idx >> (2 - j)) & 1 else ~x & MASK for j, x in enumerate((a, b, c))]
            out |= pick[0] & pick[1] & pick[2]
    return out & MASK


def _run(asm: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the asm's instructions over uint32 lanes (numpy uint64 arrays holding 32 bits)."""
    regs = dict(inputs)

    def val(tok: str):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return np.uint64(int(tok, 0))

    for line in asm.split(";"):
        line = line.strip(" \n{}")
        if not line or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "mov.b32":  # {lo, hi}, src: unpack into two 16-bit halves
            m = re.fullmatch(r"\{(\S+),\s*(\S+)\},\s*(\S+)", rest.strip())
            assert m, line
            src = val(m.group(3))
            regs[m.group(1)] = src & np.uint64(0xFFFF)
            regs[m.group(2)] = (src >> np.uint64(16)) & np.uint64(0xFFFF)
            continue
        dst, *args = [t.strip() for t in rest.split(",")]
        if op == "prmt.b32":
            regs[dst] = _prmt(val(args[0]), val(args[1]), int(args[2], 0))
        elif op == "lop3.b32":
            regs[dst] = _lop3(val(args[0]), val(args[1]), val(args[2]), int(args[3], 0))
        elif op == "shr.u32":
            regs[dst] = val(args[0]) >> np.uint64(int(args[1], 0))
        else:
            raise AssertionError(f"the emulator does not know {op!r} ({line})")
    return regs


def test_the_q4_k_unpack_gives_128_plus_each_nibble_in_byte_order():
    rng = np.random.default_rng(0)
    n = 64
    words = rng.integers(0, 2**32, size=(n, 8), dtype=np.uint64)
    words[0] = 0  # every nibble 0
    words[1] = 0xFFFFFFFF  # every nibble 15 (and each byte's sign bit set)
    regs = _run(_asm_of(dequant._nibbles_of_words), {"$8": words})
    v = [regs[f"${i}"] for i in range(4)]  # low nibbles of the word's bytes 0..3
    h = [regs[f"${i}"] for i in range(4, 8)]  # high nibbles

    def joined(x0, x1, x2, x3):  # tl.join(tl.join(x0, x2), tl.join(x1, x3)), then (n, 32)
        inner = np.stack([np.stack([x0, x2], -1), np.stack([x1, x3], -1)], -1)
        return inner.reshape(n, 32)

    bytes_ = words.astype("<u4").view(np.uint8).reshape(n, 32).astype(np.uint64)
    assert np.array_equal(joined(*v), 0x4300 | (bytes_ & 0xF))
    assert np.array_equal(joined(*h), 0x4300 | (bytes_ >> 4))

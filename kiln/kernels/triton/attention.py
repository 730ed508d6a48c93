"""Flash-decoding attention of one query token per sequence over a paged KV cache (split-K).

The cache of a layer is a pool of blocks of KV_BLOCK rows: k_pool [S, Hkv, D], v_pool [S, Hkv, DV]
with S = n_blocks * KV_BLOCK. Sequence b owns the blocks block_tables[b, :]: its key/value at
position j is pool row block_tables[b, j // KV_BLOCK] * KV_BLOCK + j % KV_BLOCK (its "slot").
Row b of the batch (one query, q[b]) attends to positions 0 .. seq_lens[b] - 1 of sequence b.

Stage 1, `_attention_decode_kernel`, grid (Hkv, P, B): program (h, p, b) takes KV head h with ALL
of its GROUP = H / Hkv query heads of row b (GQA: K/V are read once for the group) over the p-th
contiguous slice of positions 0 .. seq_lens[b] - 1, in steps of BLOCK_S keys, with an online
softmax in fp32 (base 2: q is pre-scaled by scale * log2(e)). BLOCK_S divides KV_BLOCK and a slice
starts at a multiple of BLOCK_S, so the keys of one step lie in one block: a step loads one
block-table entry (a scalar) and then BLOCK_S contiguous pool rows, as the unpaged kernel did. It
writes the slice's normalized output and log2-sum-exp per head. Stage 2,
`_attention_decode_combine_kernel`, grid (H, B), merges the active slices of each row. When one
slice covers a row's whole length (short contexts) stage 1 writes that row's output itself and
stage 2 returns at once: merging one slice would copy it (bit for bit: its weight is exp2(0) = 1).
Not where V_ROT (below): there the combine also rotates, so it always runs.

seq_lens and block_tables are read on the device; a row's slice size follows from its length (see
`_slice_of`), and P is fixed by the launcher from the shapes, so one captured CUDA graph serves
every length and every block table. Rows of different lengths share a launch: slices that start at
or past their row's length run no iteration and store nothing, and the combine of each row reads
only that row's active slices. A row of length 0 is never given (its output is left unwritten).

Both products run on tensor cores with the group padded to G_PAD >= 16 rows (tl.dot's minimum). For
f16/bf16 caches the fp32 operand (q, then the softmax weights p) is split into hi + lo in the cache
dtype and both are multiplied: hi + lo carries 16 (bf16) or 22 (f16) significant bits, so the
result is close to the fp32 reference instead of carrying a bf16 rounding of q and p (2**-9). The
extra MMAs are free here: decode attention is bound by reading K/V. An f32 cache multiplies in fp32
(input_precision "ieee", no TF32). A block-type cache (q8_0, q4_0) is read a block at a time
(kv_cache.py's `_fetch_blocks`: each row's scales in one load, the quants as contiguous bytes),
dequantized in registers (`_dequant_blocks`) and rounded to the products' dtype DT (the float
pool's beside it, else f16, as llama.cpp's kernels do; kiln/kernels/attention.py's
Paged.products_dtype), then multiplied as that float pool would be: with DT = f32 in tf32x3 (three
TF32 products). Triton's pipeliner leaves such loads (dequantized before the MMAs) unpipelined, so
with a block type each step's loads are issued one step ahead, in registers (AHEAD, `_step`). Where
V's rows are stored rotated (kiln/quant/kv.py: V_ROT) stage 1 always writes its slices' outputs as
they are, and the combine rotates the merged output back, once per head (the merge is linear): in
stage 1's epilogue the rotation cost every program 808 of its 2384 sm_90 instructions and 12
barriers (q8_0), in the combine it costs 104.

Only @triton.jit functions live here; kiln/kernels/attention.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.kv_cache import (
    KV_FLOAT,
    _dequant_blocks,
    _fetch_blocks,
    _head_ptr,
    _rotate,
)
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _slice_of(length, P, BLOCK_S: tl.constexpr, MIN_SLICE: tl.constexpr):
    """Keys per slice for this length: ceil(length / P) rounded up to BLOCK_S, at least MIN_SLICE
    (so short contexts use few, whole slices and long ones spread over all P programs)."""
    # (a + b - 1) // b, not tl.cdiv: a nested @jit call costs ~3 ms each under the interpreter.
    per = (length + P - 1) // P
    per = (per + BLOCK_S - 1) // BLOCK_S * BLOCK_S
    return tl.maximum(per, MIN_SLICE)


@triton.jit
def _step_block(bt_row, s0, end, KV_BLOCK: tl.constexpr):
    """The cache block of the step at s0 (int64; 0, unread, where s0 >= end)."""
    return tl.load(bt_row + s0 // KV_BLOCK, mask=s0 < end, other=0).to(tl.int64)


@triton.jit
def _fetch(
    base, block, s0, end, stride, W: tl.constexpr, W_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    KV_BLOCK: tl.constexpr, FMT: tl.constexpr, IS_K: tl.constexpr,
):  # fmt: skip
    """One pool's rows of the step at s0 in `block` (those < end), as loaded: a float pool's
    tile (K transposed, [W_PAD, BLOCK_S]; V [BLOCK_S, W_PAD]) and an unused placeholder, or a
    block type's (f16 scales, quants) of kv_cache.py's _fetch_blocks."""
    offs = tl.arange(0, BLOCK_S)
    s_ok = s0 + offs < end
    # The step lies in one block (BLOCK_S divides KV_BLOCK): contiguous rows.
    rows = block * KV_BLOCK + (s0 % KV_BLOCK) + offs  # [BLOCK_S] pool rows (int64)
    if FMT == KV_FLOAT:
        w_ok = tl.arange(0, W_PAD) < W
        if IS_K:  # base: [W_PAD, 1] pointers
            ok = w_ok[:, None] & s_ok[None, :]
            x = tl.load(base + rows[None, :] * stride, mask=ok, other=0.0)
        else:  # base: [1, W_PAD] pointers
            ok = s_ok[:, None] & w_ok[None, :]
            x = tl.load(base + rows[:, None] * stride, mask=ok, other=0.0)
        return x, tl.zeros([1], dtype=tl.uint16)
    else:
        return _fetch_blocks(base + rows * stride, s_ok, W, W_PAD, FMT)


@triton.jit
def _values(a, b, W_PAD: tl.constexpr, FMT: tl.constexpr, IS_K: tl.constexpr, DT: tl.constexpr):
    """_fetch's result as the MMA operand in DT (K transposed)."""
    if FMT == KV_FLOAT:
        return a.to(DT)  # a no-op for a float pool of DT
    else:
        x = _dequant_blocks(a, b, W_PAD, FMT, DT)
        if IS_K:
            x = tl.trans(x)
        return x


@triton.jit
def _attend_block(
    q_hi,  # [G_PAD, D_PAD] q * scale * log2(e) in DT (f32: q itself)
    q_lo,  # [G_PAD, D_PAD] the rest of q (SPLIT only)
    kt,  # [D_PAD, BLOCK_S] the step's keys in DT (_values)
    v,  # [BLOCK_S, DV_PAD] its values in DT
    s0,  # first position of the step, a multiple of BLOCK_S; s0 < end
    end,  # positions >= end are masked
    m_i,  # [G_PAD] running max of the log2 scores
    l_i,  # [G_PAD] running sum of exp2(score - m_i)
    acc,  # [G_PAD, DV_PAD] running sum of exp2(score - m_i) * v
    BLOCK_S: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    DT: tl.constexpr,  # the products' dtype (block-type values are rounded to it)
):
    """One online-softmax step over positions s0 .. s0 + BLOCK_S - 1 (those < end)."""
    s_ok = s0 + tl.arange(0, BLOCK_S) < end
    if INTERP or DT == tl.float32:  # the interpreter multiplies bf16 as raw uint16 bits: fp32
        kt = kt.to(tl.float32)  # operands (exact)
        v = v.to(tl.float32)
    scores = tl.dot(q_hi, kt, input_precision=PRECISION)  # [G_PAD, BLOCK_S]
    if SPLIT:
        scores = tl.dot(q_lo, kt, scores, input_precision=PRECISION)
    scores = tl.where(s_ok[None, :], scores, float("-inf"))
    # Position s0 < end is valid, so m_new is finite: no -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])  # [G_PAD, BLOCK_S]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if SPLIT:
        p_hi = p.to(DT)
        p_lo = (p - p_hi.to(tl.float32)).to(DT)
        if INTERP:
            p_hi = p_hi.to(tl.float32)
            p_lo = p_lo.to(tl.float32)
        acc = tl.dot(p_hi, v, acc, input_precision=PRECISION)
        acc = tl.dot(p_lo, v, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _step(
    q_hi, q_lo, k_base, v_base, bt_row, s0, end, stride_kc, stride_vc, m_i, l_i, acc,
    ka, kb, va, vb, block,  # AHEAD: this step's loads and the next step's block
    D: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, KV_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr, D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, K_FMT: tl.constexpr, V_FMT: tl.constexpr, DT: tl.constexpr,
    AHEAD: tl.constexpr,
):  # fmt: skip
    """The step at s0 (< end): its K and V read (AHEAD: loaded by the step before, which also
    loaded this step's block; this one then issues the next step's loads before its MMAs, so
    their latency overlaps them), then one online-softmax step. -> the state, and AHEAD the
    next step's loads and the block after (masked, so never read, past `end`)."""
    if AHEAD:
        kt = _values(ka, kb, D_PAD, K_FMT, True, DT)
        v = _values(va, vb, DV_PAD, V_FMT, False, DT)
        nxt = s0 + BLOCK_S
        ka, kb = _fetch(k_base, block, nxt, end, stride_kc, D, D_PAD, BLOCK_S, KV_BLOCK,
                        K_FMT, True)  # fmt: skip
        va, vb = _fetch(v_base, block, nxt, end, stride_vc, DV, DV_PAD, BLOCK_S, KV_BLOCK,
                        V_FMT, False)  # fmt: skip
        block = _step_block(bt_row, nxt + BLOCK_S, end, KV_BLOCK)
    else:
        here = _step_block(bt_row, s0, end, KV_BLOCK)
        k0, k1 = _fetch(k_base, here, s0, end, stride_kc, D, D_PAD, BLOCK_S, KV_BLOCK, K_FMT, True)
        v0, v1 = _fetch(v_base, here, s0, end, stride_vc, DV, DV_PAD, BLOCK_S, KV_BLOCK, V_FMT,
                        False)  # fmt: skip
        kt = _values(k0, k1, D_PAD, K_FMT, True, DT)
        v = _values(v0, v1, DV_PAD, V_FMT, False, DT)
    m_i, l_i, acc = _attend_block(
        q_hi, q_lo, kt, v, s0, end, m_i, l_i, acc, BLOCK_S, SPLIT, PRECISION, INTERP, DT
    )
    return m_i, l_i, acc, ka, kb, va, vb, block


@triton.jit
def _attention_decode_kernel(
    q_ptr,  # [B, H, D] f32/f16/bf16 contiguous
    k_ptr,  # [S, Hkv, D] pool: f32/f16/bf16, or uint8 blocks; row stride stride_kc
    v_ptr,  # [S, Hkv, DV] pool (a float pool beside a float K: its dtype), stride_vc
    bt_ptr,  # int32 [B, NB], row stride stride_bt: the blocks of each sequence
    len_ptr,  # int64 [B]: row b attends to positions 0..seq_lens[b]-1 (>= 1)
    part_o_ptr,  # f32 [B, P, H, DV]: each slice's softmax-normalized output
    part_lse_ptr,  # f32 [B, P, H]: log2 of each slice's sum of exp2(score), score in log2 units
    out_ptr,  # f32 [B, H, DV]: row b written here when one slice covers its length
    qk_scale,  # scale * log2(e)
    NB,  # blocks per table row: lengths are clamped to NB * KV_BLOCK
    stride_bt,
    P,  # slices per row (grid axis 1)
    H,
    stride_kc,
    stride_vc,
    GROUP: tl.constexpr,  # H // Hkv
    G_PAD: tl.constexpr,  # >= 16, power of 2, >= GROUP
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,  # keys per step, a power of 2 dividing KV_BLOCK
    KV_BLOCK: tl.constexpr,  # pool rows per cache block (block_size)
    MIN_SLICE: tl.constexpr,  # a multiple of BLOCK_S
    DT: tl.constexpr,  # the products' dtype: the float pool's, f16 for two block types
    SPLIT: tl.constexpr,  # DT f16/bf16: hi/lo split of the fp32 operands (module docstring)
    PRECISION: tl.constexpr,  # fp32 operands: "ieee" (f32 cache), "tf32x3" (a block type beside)
    INTERP_SLICE: tl.constexpr,  # largest slice under TRITON_INTERPRET, else 0 (see below)
    K_FMT: tl.constexpr = KV_FLOAT,  # k_ptr: a float pool, or uint8 blocks (kv_cache.py)
    V_FMT: tl.constexpr = KV_FLOAT,
    V_ROT: tl.constexpr = False,  # V's rows stored rotated: slices always go to the combine
    AHEAD: tl.constexpr = False,  # each step's loads issued a step ahead (_step)
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    interp: tl.constexpr = INTERP_SLICE > 0
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), NB * KV_BLOCK)
    size = _slice_of(length, P, BLOCK_S, MIN_SLICE)
    start = pid * size
    end = tl.minimum(start + size, length)  # <= start: an idle slice
    bt_row = bt_ptr + b * stride_bt

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    heads = kvh * GROUP + g  # [G_PAD] query heads of this KV head
    g_ok = g < GROUP
    q = tl.load(
        q_ptr + (b * H + heads[:, None]) * D + d[None, :],
        mask=g_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    q = q.to(tl.float32) * qk_scale  # [G_PAD, D_PAD]
    if SPLIT:
        q_hi = q.to(DT)
        q_lo = (q - q_hi.to(tl.float32)).to(DT)
    else:
        q_hi = q
        q_lo = q  # unused
    if interp:  # the interpreter multiplies bf16 as raw uint16 bits: fp32 operands (exact)
        q_hi = q_hi.to(tl.float32)
        q_lo = q_lo.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)  # running max of log2 scores
    l_i = tl.zeros([G_PAD], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([G_PAD, DV_PAD], dtype=tl.float32)
    # Head kvh's row in pool row 0 (block types: a byte pointer); a float pool's values as
    # [D_PAD, 1] (K is read transposed, [D_PAD, BLOCK_S]) and [1, DV_PAD]
    k_base = _head_ptr(k_ptr, kvh, D, K_FMT)
    v_base = _head_ptr(v_ptr, kvh, DV, V_FMT)
    if K_FMT == KV_FLOAT:
        k_base = k_base + d[:, None]
    if V_FMT == KV_FLOAT:
        v_base = v_base + dv[None, :]
    # Triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 refuses to
    # turn into a Python int for range(): there the loop runs over the largest slice and skips
    # the steps past `end` by a Python `if`. Compiled, it runs over [start, end) only, so an
    # idle slice costs one load of its row's length.
    if AHEAD:  # the first step's loads (and the second's block) before the loop
        block = _step_block(bt_row, start, end, KV_BLOCK)
        ka, kb = _fetch(k_base, block, start, end, stride_kc, D, D_PAD, BLOCK_S, KV_BLOCK,
                        K_FMT, True)  # fmt: skip
        va, vb = _fetch(v_base, block, start, end, stride_vc, DV, DV_PAD, BLOCK_S, KV_BLOCK,
                        V_FMT, False)  # fmt: skip
        block = _step_block(bt_row, start + BLOCK_S, end, KV_BLOCK)
    else:  # placeholders, never read
        ka = tl.zeros([1], dtype=tl.uint16)
        kb = ka
        va = ka
        vb = ka
        block = start.to(tl.int64)
    if interp:
        for s0 in range(0, INTERP_SLICE, BLOCK_S):
            if start + s0 < end:
                m_i, l_i, acc, ka, kb, va, vb, block = _step(
                    q_hi, q_lo, k_base, v_base, bt_row, start + s0, end, stride_kc, stride_vc,
                    m_i, l_i, acc, ka, kb, va, vb, block, D, DV, BLOCK_S, KV_BLOCK, SPLIT,
                    PRECISION, interp, D_PAD, DV_PAD, K_FMT, V_FMT, DT, AHEAD,
                )  # fmt: skip
    else:
        for s0 in range(start, end, BLOCK_S):
            m_i, l_i, acc, ka, kb, va, vb, block = _step(
                q_hi, q_lo, k_base, v_base, bt_row, s0, end, stride_kc, stride_vc,
                m_i, l_i, acc, ka, kb, va, vb, block, D, DV, BLOCK_S, KV_BLOCK, SPLIT,
                PRECISION, interp, D_PAD, DV_PAD, K_FMT, V_FMT, DT, AHEAD,
            )  # fmt: skip

    active = start < end
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # idle slices and padded heads store nothing
    o = acc / l_safe[:, None]
    o_mask = active & g_ok[:, None] & (dv[None, :] < DV)
    if size >= length and not V_ROT:  # the only slice: its result is the row's output
        o_ptrs = out_ptr + (b * H + heads[:, None]) * DV + dv[None, :]
        tl.store(o_ptrs, o, mask=o_mask)
    else:
        part = b * P + pid
        o_ptrs = part_o_ptr + (part * H + heads[:, None]) * DV + dv[None, :]
        tl.store(o_ptrs, o, mask=o_mask)
        tl.store(part_lse_ptr + part * H + heads, m_i + tl.log2(l_safe), mask=active & g_ok)


@triton.jit
def _attention_decode_combine_kernel(
    part_o_ptr,  # f32 [B, P, H, DV]
    part_lse_ptr,  # f32 [B, P, H]
    out_ptr,  # f32 [B, H, DV]
    len_ptr,  # int64 [B]
    C,  # NB * KV_BLOCK: lengths are clamped to it
    P,
    H,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MIN_SLICE: tl.constexpr,
    CHUNK: tl.constexpr,  # slices merged per step
    INTERP_P: tl.constexpr,  # P rounded up to CHUNK under TRITON_INTERPRET, else 0
    V_ROT: tl.constexpr = False,  # V's rows stored rotated: the merged output is rotated back
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    h = tl.program_id(0)
    b = tl.program_id(1)
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), C)
    size = _slice_of(length, P, BLOCK_S, MIN_SLICE)
    n_active = (length + size - 1) // size  # <= P
    if n_active <= 1 and not V_ROT:  # stage 1 wrote the output
        return
    c = tl.arange(0, CHUNK)
    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < DV
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    den = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([DV_PAD], dtype=tl.float32)
    row = b * P  # this row's first slice
    # Same loop-bound split as in the kernel above.
    for p0 in range(0, INTERP_P if INTERP_P > 0 else n_active, CHUNK):
        p = p0 + c
        p_ok = p < n_active
        lse = tl.load(part_lse_ptr + (row + p) * H + h, mask=p_ok, other=float("-inf"))  # [CHUNK]
        o = tl.load(
            part_o_ptr + ((row + p[:, None]) * H + h) * DV + dv[None, :],
            mask=p_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [CHUNK, DV_PAD]
        m_new = tl.maximum(m, tl.max(lse, axis=0))  # finite: the first chunk holds slice 0
        w = tl.exp2(lse - m_new)  # [CHUNK]
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m = m_new
    o = acc / den
    if V_ROT:  # once per head, on the merged output (the merge is linear)
        o = _rotate(o, DV_PAD)
    tl.store(out_ptr + (b * H + h) * DV + dv, o, mask=dv_ok)

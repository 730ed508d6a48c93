"""Causal flash attention of prompt chunks (many queries per sequence) over a paged KV cache.

The cache of a layer is a pool of blocks of KV_BLOCK rows: k_pool [S, Hkv, D], v_pool [S, Hkv, DV]
with S = n_blocks * KV_BLOCK. Sequence b owns the blocks block_tables[b, :]: its key/value at
position j is pool row block_tables[b, j // KV_BLOCK] * KV_BLOCK + j % KV_BLOCK. The batch's T
queries lie side by side, sequence b's in rows query_start[b] .. query_start[b + 1] - 1; query t
sees the keys of its sequence at positions 0 .. min(positions[t], seq_lens[b] - 1) (the chunk's
own K/V are in the pool already).

Rows of a tile. For KV head h the GROUP = H / Hkv query heads that share it are taken together
(GQA: each K/V tile is loaded once for the group): sequence b has n_b * GROUP "rows" (token-major,
head-minor: row r is token r // GROUP, query head h * GROUP + r % GROUP), and a program takes
BLOCK_R consecutive rows of one sequence (BLOCK_R / GROUP tokens; any GROUP, no padding of the
group to a power of 2) as the M side of both MMAs. Padding rows (past the sequence's last row)
compute on zeros and are not stored.

Which tile a program takes is found on the device from query_start: sequence b has
ceil(n_b * GROUP / BLOCK_R) tiles; every program loads the B + 1 starts as one vector, counts
tiles per sequence and takes its own by a prefix sum (one load, no loop over B, no table built by
extra launches; B_PAD bounds B as a constexpr). Programs are numbered heaviest first (the last
tile of the last sequence first: a tile's work grows with its positions, so the long ones start in
the first wave), and the grid's extra programs (its size is an upper bound known from the shapes)
return at once.

The key loop runs in two parts, in steps of BLOCK_N keys (BLOCK_N divides KV_BLOCK, so a step lies
in one block: one block-table load, then BLOCK_N contiguous pool rows):
  - keys 0 .. lo - 1, which every row of the tile sees (lo: the tile's smallest position + 1,
    rounded down to BLOCK_N): no mask;
  - keys lo .. hi - 1 (hi: the tile's largest position + 1): the diagonal steps, masked per row;
keys past hi are never read (the pool rows there may hold anything, even NaN).

Online softmax in fp32 in base 2 (q is pre-scaled by scale * log2(e)). Both products run on
tensor cores with operands in the cache dtype (q and the softmax weights p are rounded to f16 /
bf16 as in FlashAttention) and fp32 accumulation; an f32 cache multiplies in fp32 (input_precision
"ieee"). A block-type cache (q8_0, q4_0) is dequantized in registers a block at a time
(kv_cache.py's `_load_block_rows`) and its values rounded to the products' dtype DT, as in the
decode kernel (attention.py), and where V's rows are stored rotated the output is rotated back
before it is stored (V_ROT). Under TRITON_INTERPRET the same rounded operands are multiplied in
fp32 (the interpreter multiplies bf16 as raw uint16 bits), which is what the tensor cores compute,
up to summation order.

Only @triton.jit functions live here; kiln/kernels/flash_attention.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.kv_cache import KV_FLOAT, _head_ptr, _load_block_rows, _rotate_rows
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _load_rows(
    base, rows, stride, n_ok, N_MASK: tl.constexpr, W: tl.constexpr, W_PAD: tl.constexpr,
    FMT: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, W_PAD] from base ([1, W_PAD] pointers to column w of pool row 0; a block type
    (FMT): a byte pointer to the head's row in pool row 0) at the given pool rows; rows with
    n_ok False (N_MASK) and columns >= W read as 0. A block type's values come rounded to the
    products' dtype DT (kv_cache.py's _dequant_blocks: for f16 by the bits, no conversions)."""
    if FMT != KV_FLOAT:
        if N_MASK:
            x = _load_block_rows(base + rows * stride, n_ok, W, W_PAD, FMT, DT)
        else:
            x = _load_block_rows(base + rows * stride, rows >= 0, W, W_PAD, FMT, DT)
    elif N_MASK:
        ptrs = base + rows[:, None] * stride
        if W == W_PAD:
            x = tl.load(ptrs, mask=n_ok[:, None], other=0.0)
        else:
            w_ok = tl.arange(0, W_PAD) < W
            x = tl.load(ptrs, mask=n_ok[:, None] & w_ok[None, :], other=0.0)
    else:
        ptrs = base + rows[:, None] * stride
        if W == W_PAD:
            x = tl.load(ptrs)
        else:
            w_ok = tl.arange(0, W_PAD) < W
            x = tl.load(ptrs, mask=w_ok[None, :], other=0.0)
    return x


@triton.jit
def _flash_step(
    q,  # [BLOCK_R, D_PAD] q * scale * log2(e), in the cache dtype (f32 under the interpreter)
    k_base,  # [1, D_PAD] pointers to K[0, h, d]; a block type: head h's bytes in pool row 0
    v_base,  # [1, DV_PAD] pointers to V[0, h, dv]; a block type: as k_base
    bt_row,  # pointer to block_tables[b, 0] (int32)
    s0,  # first key of the step, a multiple of BLOCK_N
    last,  # [BLOCK_R] the last key each row sees (MASKED only)
    hi,  # keys >= hi are not read (MASKED only)
    stride_kc,
    stride_vc,
    m_i,  # [BLOCK_R] running max of the log2 scores
    l_i,  # [BLOCK_R] running sum of exp2(score - m_i)
    acc,  # [BLOCK_R, DV_PAD] running sum of exp2(score - m_i) * v
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    MASKED: tl.constexpr,  # a diagonal step: per-row causal mask, keys past hi not read
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    K_FMT: tl.constexpr,  # KV_FLOAT: k_base typed; a block type: k_base a byte pointer
    V_FMT: tl.constexpr,
    DT: tl.constexpr,  # the products' dtype (a block type's values are rounded to it)
):
    """One online-softmax step over keys s0 .. s0 + BLOCK_N - 1."""
    offs = tl.arange(0, BLOCK_N)
    keys = s0 + offs
    # The step lies in one block (BLOCK_N divides KV_BLOCK): one table entry, contiguous rows.
    block = tl.load(bt_row + s0 // KV_BLOCK).to(tl.int64)
    rows = block * KV_BLOCK + (s0 % KV_BLOCK) + offs  # [BLOCK_N] pool rows (int64)
    n_ok = keys < hi
    k = _load_rows(k_base, rows, stride_kc, n_ok, MASKED, D, D_PAD, K_FMT, DT)  # [BLOCK_N, D_PAD]
    v = _load_rows(v_base, rows, stride_vc, n_ok, MASKED, DV, DV_PAD, V_FMT, DT)
    if INTERP:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k = k.to(DT)
        v = v.to(DT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_R, BLOCK_N] log2 units
    if MASKED:
        s = tl.where(keys[None, :] <= last[:, None], s, float("-inf"))
    # Every row sees a key in its first step (see the kernel), so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    p_op = p.to(DT)
    if INTERP:
        p_op = p_op.to(tl.float32)
    acc = tl.dot(p_op, v, acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _flash_attention_kernel(
    q_ptr,  # [T, H, D] f32/f16/bf16 contiguous
    k_ptr,  # [S, Hkv, D] pool, f32/f16/bf16, row stride stride_kc, unit stride along D
    v_ptr,  # [S, Hkv, DV] pool, same dtype as k, row stride stride_vc
    bt_ptr,  # int32 [B, NB], row stride stride_bt: the blocks of each sequence
    len_ptr,  # int64 [B]: each sequence's KV length (keys 0..seq_lens[b]-1 exist)
    qs_ptr,  # int64 [B + 1]: sequence b's queries are rows qs[b] .. qs[b + 1] - 1
    pos_ptr,  # int64 [T]: each query's position
    out_ptr,  # f32 [T, H, DV]
    qk_scale,  # scale * log2(e)
    B,
    NB,  # blocks per table row: KV lengths are clamped to NB * KV_BLOCK
    stride_bt,
    H,
    stride_kc,
    stride_vc,
    GROUP: tl.constexpr,  # H // Hkv
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,  # (token, head) rows per program: the MMAs' M
    BLOCK_N: tl.constexpr,  # keys per step, a power of 2 dividing KV_BLOCK
    KV_BLOCK: tl.constexpr,  # pool rows per cache block (block_size)
    B_PAD: tl.constexpr,  # a power of 2 >= B
    DT: tl.constexpr,  # the products' dtype: the float pool's, f16 for two block types
    PRECISION: tl.constexpr,  # fp32 operands: "ieee" (f32 cache), "tf32x3" (a block type beside)
    INTERP_KEYS: tl.constexpr,  # NB * KV_BLOCK under TRITON_INTERPRET, else 0 (see below)
    K_FMT: tl.constexpr = KV_FLOAT,  # k_ptr: a float pool, or uint8 blocks (kv_cache.py)
    V_FMT: tl.constexpr = KV_FLOAT,
    V_ROT: tl.constexpr = False,  # V's rows stored rotated: the output is rotated back
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
):
    if PDL:
        wait_for_inputs()
    interp: tl.constexpr = INTERP_KEYS > 0
    kvh = tl.program_id(0)
    pid = tl.program_id(1)

    # -- which tile: sequence b has ceil(n_b * GROUP / BLOCK_R) tiles; heaviest first ---------
    bi = tl.arange(0, B_PAD)
    b_ok = bi < B
    starts = tl.load(qs_ptr + bi, mask=b_ok, other=0).to(tl.int32)
    ends = tl.load(qs_ptr + bi + 1, mask=b_ok, other=0).to(tl.int32)
    n_tiles = ((ends - starts) * GROUP + BLOCK_R - 1) // BLOCK_R  # [B_PAD]; 0 past B
    total = tl.sum(n_tiles, axis=0)
    if pid >= total:  # the grid is an upper bound of the tiles
        return
    t = total - 1 - pid
    through = tl.cumsum(n_tiles, axis=0)  # tiles of sequences 0..b
    b = tl.sum((through <= t).to(tl.int32), axis=0)  # the sequence of tile t
    is_b = bi == b
    tile = t - tl.sum(tl.where(bi < b, n_tiles, 0), axis=0)
    start = tl.sum(tl.where(is_b, starts, 0), axis=0)
    n_rows = tl.sum(tl.where(is_b, ends - starts, 0), axis=0) * GROUP
    kv_len = tl.minimum(tl.load(len_ptr + b).to(tl.int32), NB * KV_BLOCK)
    bt_row = bt_ptr + b * stride_bt

    # -- the tile's rows: (token, query head) pairs, token-major --------------------------------
    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    tok = (start + r // GROUP).to(tl.int64)  # [BLOCK_R] query rows of the batch
    head = kvh * GROUP + r % GROUP
    pos = tl.load(pos_ptr + tok, mask=r_ok, other=0).to(tl.int32)
    hi = tl.minimum(tl.max(tl.where(r_ok, pos, -1), axis=0) + 1, kv_len)  # keys < hi are read
    first = tl.min(tl.where(r_ok, pos, 2147483647), axis=0) + 1  # keys < first: every row's
    lo = tl.minimum(first, kv_len) // BLOCK_N * BLOCK_N  # unmasked steps: keys < lo
    last = tl.minimum(pos, hi - 1)  # [BLOCK_R] the last key each row sees
    # Every row sees key lo in the first masked step (lo <= its position), or has seen keys
    # 0..lo-1 already: a step never meets a row with no finite score so far and none in it.

    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q_rows = (tok * H + head) * D  # [BLOCK_R]
    if D == D_PAD:
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)
    else:
        q_mask = r_ok[:, None] & (d[None, :] < D)
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(DT)  # [BLOCK_R, D_PAD]
    if interp:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, DV_PAD], dtype=tl.float32)
    # Head kvh's row in pool row 0 (block types: a byte pointer); a float pool's values as
    # [1, D_PAD] and [1, DV_PAD]
    k_base = _head_ptr(k_ptr, kvh, D, K_FMT)
    v_base = _head_ptr(v_ptr, kvh, DV, V_FMT)
    if K_FMT == KV_FLOAT:
        k_base = k_base + d[None, :]
    if V_FMT == KV_FLOAT:
        v_base = v_base + dv[None, :]
    # Triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 refuses to
    # turn into a Python int for range(): there the loop runs over the whole table row and
    # skips the steps past hi by a Python `if` (as in attention.py). Compiled, the two loops run
    # over [0, lo) and [lo, hi) only.
    if interp:
        for s0 in range(0, INTERP_KEYS, BLOCK_N):
            if s0 < lo:
                m_i, l_i, acc = _flash_step(
                    q, k_base, v_base, bt_row, s0, last, hi, stride_kc, stride_vc, m_i, l_i,
                    acc, D, DV, BLOCK_N, KV_BLOCK, False, PRECISION, interp, D_PAD, DV_PAD, K_FMT,
                    V_FMT, DT,
                )  # fmt: skip
            elif s0 < hi:
                m_i, l_i, acc = _flash_step(
                    q, k_base, v_base, bt_row, s0, last, hi, stride_kc, stride_vc, m_i, l_i,
                    acc, D, DV, BLOCK_N, KV_BLOCK, True, PRECISION, interp, D_PAD, DV_PAD, K_FMT,
                    V_FMT, DT,
                )  # fmt: skip
    else:
        for s0 in range(0, lo, BLOCK_N):
            m_i, l_i, acc = _flash_step(
                q, k_base, v_base, bt_row, s0, last, hi, stride_kc, stride_vc, m_i, l_i, acc,
                D, DV, BLOCK_N, KV_BLOCK, False, PRECISION, interp, D_PAD, DV_PAD, K_FMT, V_FMT, DT,
            )  # fmt: skip
        for s0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _flash_step(
                q, k_base, v_base, bt_row, s0, last, hi, stride_kc, stride_vc, m_i, l_i, acc,
                D, DV, BLOCK_N, KV_BLOCK, True, PRECISION, interp, D_PAD, DV_PAD, K_FMT, V_FMT, DT,
            )  # fmt: skip

    o_rows = (tok * H + head) * DV  # [BLOCK_R]
    o = acc / l_i[:, None]
    if V_ROT:
        o = _rotate_rows(o, BLOCK_R, DV_PAD)
    if DV == DV_PAD:
        tl.store(out_ptr + o_rows[:, None] + dv[None, :], o, mask=r_ok[:, None])
    else:
        o_mask = r_ok[:, None] & (dv[None, :] < DV)
        tl.store(out_ptr + o_rows[:, None] + dv[None, :], o, mask=o_mask)

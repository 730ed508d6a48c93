"""Quantized GEMM on tensor cores: out[M, N] = x[M, K] @ W[N, K]^T, W read in its GGUF format.

Each program owns a [BLOCK_M, BLOCK_N] tile of the output and walks K one BLOCK_K step at a time:
the weight tile [BLOCK_N, BLOCK_K] is dequantized in registers with kernels/triton/dequant.py's
helpers (the mat-vec's and the embedding's) and rounded to bf16, the x tile is loaded as bf16
(software-pipelined through shared memory), and `tl.dot` multiplies them with fp32 accumulation
(wgmma on sm_90), in one of two orders (SWAP_AB, a tuned choice):
- SWAP_AB: acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, the output transposed. The dequantized
  weight is the left operand, which wgmma reads from registers: it never goes through shared
  memory, and the wgmma of a step runs while the next step's tile is dequantized (the sm_90
  compile keeps 3 wgmma groups in flight in the loop). The left operand takes 64 rows a
  warpgroup, the right one 8..256 columns: BLOCK_N >= 64 * warps / 4, and BLOCK_M from 16 up,
  so small M runs on wgmma too.
- otherwise acc[BLOCK_M, BLOCK_N] = x_tile @ W_tile^T: the weight tile is stored to shared
  memory for wgmma (BLOCK_M >= 64; below, mma.sync) and each step waits for its wgmma, but the
  dequantization keeps its own register layout and takes fewer instructions.
Counted in the sm_90 SASS of the K loop (not timed), instructions per weight value and thread at
128 x 128 x 64, 8 warps, SWAP_AB / not: Q8_0 8.0 / 7.4, Q4_0 9.4 / 8.0, Q4_1 8.6 / 7.8, Q5_0
14.3 / 12.9, Q5_1 11.0 / 10.5, Q4_K 12.2 / 12.2, Q5_K 15.9 / 16.3, Q6_K 17.9 / 17.6. Per SM and
step the tensor cores need BLOCK_M * BLOCK_N * BLOCK_K / 2048 cycles at the H100's peak, the
dequantization about BLOCK_N * BLOCK_K * (instructions per value) / 128 issue cycles: it hides
under the wgmma only from BLOCK_M = 16 * (instructions per value) on, hence BLOCK_M = 256 for
large M.

Weight tiles by format family (BLOCK_VALUES), as _weight_tile reads them:
- float formats (1): w_ptr is typed (f32/f16/bf16) [N, K]; K is masked.
- block formats: the tile is [BLOCK_N, BLOCK_K // 32, 2, 16] (row, group of 32 values, half,
  value): group g of the row is legacy block g, or sub-block g % 8 of K-quant super-block g // 8,
  so BLOCK_K may be any power of two >= 32 for every format. The half is its own axis so that a
  nibble's shift is the same for every value of a register (the legacy formats keep values i and
  16 + i in one byte): one load per byte, constant shifts (Q4_0: 12.7 instructions per value with
  a [.., 32] axis). K is a whole number of blocks (as the mat-vec requires); a step past the last
  block (K not a multiple of BLOCK_K, EVEN_K off) reads block 0 instead and zeroes those values.
Rows past M and N are clamped to M - 1 and N - 1 so loads need no mask along them; only the store
is masked. Split-K (program_id(1), decode-sized launches: kernels/matmul.py auto_splits): each
split runs its own range of K and writes its partial sums at out_ptr + split * stride_os; the
launcher adds them in split order (no atomics: the result does not depend on the scheduling).
Programs run in grouped order (GROUP_M row tiles per column sweep), so the weight
tiles a group reads stay in L2 while its GROUP_M row tiles use them.

The quant domain (QUANTS, MatmulConfig.quants; block formats, SWAP_AB): instead of dequantizing
each value, a group of values (32; Q6_K 16, the span of its scales) enters the tensor cores as its
integer quants, exact in bf16 (the 4- to 6-bit ones as 128 + q, made by OR-ing the bits into
128.0: no convert), and the group's two per-row factors are applied to its [BLOCK_N, BLOCK_M]
partial sums: value = ds * Q - coef, so acc += ds * (Q . x) - coef * sum(x), with the group sums
of x computed by the launcher. No weight value is rounded to bf16 (only x is), and a value costs
no scale FMA or convert. Q4_K and Q5_K take their groups in pairs that share the quant bytes (the
compiled Q4_K loads them as uint32 words and unpacks them by inline PTX), Q6_K in fours that
share theirs; a K-quant step is whole super-blocks, so each group's scale bytes are at constant
offsets. In the sm_90 SASS of the K loop at 16 x 64 x 256 (4 warps), instructions a value and
thread against the value domain's 16 x 64 x 64: Q4_K 6.6 / 11.1, Q5_K 9.4 / 15.1, Q6_K 12.2 /
21.3, Q4_0 7.9 / 9.4; Q8_0 8.2 / 8.0 gains nothing (a convert a value). The epilogue grows with
BLOCK_M (2 FMAs an output and group), so it serves small M. AHEAD (Q4_K and Q5_K, a super-block a
step) fetches the next step's bytes before this step's groups run (_k4_fetch, _k4_pair): Q4_K
at 16 x 64 x 256 on 4 warps then takes 255 registers and spills 8 bytes. With EXACT, x comes as
three bf16 parts whose sum is the fp32 x (3 x 8 significant bits), each multiplied by the exact
Q: nothing is rounded but the fp32 sums, for batched decode (Q4_K 8.2 instructions a value
against the tf32x3 tiles' 18.3 at EXACT_CONFIG; Q6_K 14.6 / 25.2). Not timed on a GPU yet: the
tuned table (scripts/tune_matmul.py tries it) decides where it runs.

`_dequant_kernel` writes the same bf16 tiles to memory: the first half of dequant_matmul
(kiln/kernels/matmul.py), whose second half is torch's bf16 matmul (cuBLAS).

Only @triton.jit functions live here; kiln/kernels/matmul.py launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kiln.kernels.triton.dequant import (
    Q4_K,
    Q5_K,
    Q6_K,
    _decode_k,
    _decode_legacy,
    _f16_at,
    _fetch_k,
    _fetch_legacy,
    _k4_fetch,
    _k4_pair,
    _legacy_quants,
    _q6k_quad,
)
from kiln.kernels.triton.pdl import wait_for_inputs


@triton.jit
def _to_bf16(w, INTERPRETED: tl.constexpr):
    """fp32 -> bf16, rounding to nearest even. Under TRITON_INTERPRET by hand: Triton 3.6's
    interpreter truncates f32 -> bf16 (the GPU's cvt.rn rounds to nearest even, as torch)."""
    if INTERPRETED:
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # NaN and inf keep their class
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(tl.bfloat16)


@triton.jit
def _dot(a, b, acc, EXACT: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b on tensor cores with fp32 accumulation: bf16 a, b, or (EXACT) fp32 a, b as
    three tf32 products (tf32x3: each operand split into a tf32 and its tf32 remainder, the
    small-small product dropped), within a few fp32 ulps of an fp32 dot. Triton 3.6's
    interpreter multiplies bf16 operands as their uint16 bits; there they go in as fp32 (exact),
    whose products are exact as the tensor cores' are."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif EXACT:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_groups(k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """A block-format step's indices: (g [1, G, 1, 1], the group of 32 values of the row, 0 for
    groups past K; j [1, 1, 2, 16], the value in the group; g_ok, whether g is inside K)."""
    G: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, G)[None, :, None, None]
    h = tl.arange(0, 2)[None, None, :, None]  # [1, 1, 2, 1]: half of the group
    i = tl.arange(0, 16)[None, None, None, :]  # [1, 1, 1, 16]
    g_ok = g < K // 32
    if not EVEN_K:
        g = tl.where(g_ok, g, 0)  # groups past K read the row's first block
    return g, 16 * h + i, g_ok


@triton.jit
def _weight_fetch(
    w_rows,
    k0,
    K,
    FMT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """The loads of _weight_tile's step (no use of what they return: _weight_decode's): the
    typed [BLOCK_N, BLOCK_K] tile of a float format, else dequant.py's fetch tuple."""
    if BLOCK_VALUES == 1:
        k = k0 + tl.arange(0, BLOCK_K)[None, :]
        if EVEN_K:
            return tl.load(w_rows + k)
        else:
            return tl.load(w_rows + k, mask=k < K, other=0.0)
    else:
        row4 = tl.expand_dims(tl.expand_dims(w_rows, 2), 3)  # [BLOCK_N, 1, 1, 1]
        g, j, _ = _tile_groups(k0, K, BLOCK_K, EVEN_K)
        if BLOCK_VALUES == 32:
            return _fetch_legacy(row4 + g * TYPE_SIZE, j, FMT)
        else:
            return _fetch_k(row4 + (g // 8) * TYPE_SIZE, g % 8, j, FMT)


@triton.jit
def _weight_decode(
    raw,
    k0,
    K,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    EXACT: tl.constexpr,
):
    """bf16 (EXACT: fp32) [BLOCK_N, BLOCK_K]: the values of _weight_fetch's loads, 0 past K."""
    if BLOCK_VALUES == 1:
        w = raw
        if EXACT:
            w = w.to(tl.float32)
        elif w.dtype != tl.bfloat16:  # f16 and f32 through fp32 (exact for f16)
            w = _to_bf16(w.to(tl.float32), INTERPRETED)
    else:
        g, j, g_ok = _tile_groups(k0, K, BLOCK_K, EVEN_K)
        if BLOCK_VALUES == 32:
            w4 = _decode_legacy(raw, j, FMT)
        else:
            w4 = _decode_k(raw, g % 8, j, FMT)
        if not EVEN_K:
            w4 = tl.where(g_ok, w4, 0.0)
        w = tl.reshape(w4, (BLOCK_N, BLOCK_K))
        if not EXACT:
            w = _to_bf16(w, INTERPRETED)
    return w


@triton.jit
def _weight_tile(
    w_rows,  # [BLOCK_N, 1] pointers to the tile's weight rows (typed or uint8)
    k0,  # first value of the step: a multiple of BLOCK_K
    K,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no step overruns it
    INTERPRETED: tl.constexpr,  # under TRITON_INTERPRET (_to_bf16)
    EXACT: tl.constexpr = False,  # fp32 values, not rounded to bf16
):
    """bf16 (EXACT: fp32) [BLOCK_N, BLOCK_K]: values k0 .. k0 + BLOCK_K of the rows, 0 past K."""
    raw = _weight_fetch(w_rows, k0, K, FMT, BLOCK_K, TYPE_SIZE, BLOCK_VALUES, EVEN_K)
    return _weight_decode(
        raw, k0, K, FMT, BLOCK_N, BLOCK_K, BLOCK_VALUES, EVEN_K, INTERPRETED, EXACT
    )


@triton.jit
def _k_loop(
    acc,  # [BLOCK_N, BLOCK_M] (SWAP_AB) or [BLOCK_M, BLOCK_N] fp32
    x_rows,  # [BLOCK_M, 1] pointers to the x rows of the tile
    w_rows,  # [BLOCK_N, 1] pointers to the weight rows of the tile
    k_base,  # first value of the K range: a multiple of BLOCK_K (split-K), else 0
    k_len,  # values of the range: a multiple of BLOCK_K, or K; steps past K add zeros
    K,
    K_INTERP: tl.constexpr,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    EXACT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    AHEAD: tl.constexpr = False,
):
    """acc + the tile's products over values k_base .. k_base + k_len of K: per BLOCK_K step the
    x tile (bf16, or fp32 when EXACT) and the weight tile dequantized in registers, multiplied
    by _dot in SWAP_AB's order. AHEAD: each step's weight loads are issued one step early, into
    registers, the last step fetching itself again. Without it Triton's pipeliner stages some of
    them through shared memory (on sm_90 the Q4_K quants at 16 x 64 x 64, in 3 stages) and
    leaves the others (scales) in their step. Shared by the dense GEMM and the grouped one
    (triton/moe.py)."""
    # Triton 3.6's interpreter holds a scalar argument as a 1-element array, which numpy >= 2.4
    # refuses to turn into a Python int for range(); there the launcher passes k_len as a
    # constexpr. Compiled kernels keep it a runtime value, so one binary serves every K.
    if AHEAD:
        last = k_base + (((K_INTERP if K_INTERP > 0 else k_len) - 1) // BLOCK_K) * BLOCK_K
        raw = _weight_fetch(w_rows, k_base, K, FMT, BLOCK_K, TYPE_SIZE, BLOCK_VALUES, EVEN_K)
    for kk in range(0, K_INTERP if K_INTERP > 0 else k_len, BLOCK_K):
        k0 = k_base + kk
        kx = k0 + tl.arange(0, BLOCK_K)[None, :]
        if EVEN_K:
            xa = tl.load(x_rows + kx)
        else:
            xa = tl.load(x_rows + kx, mask=kx < K, other=0.0)
        if AHEAD:
            k_next = tl.minimum(k0 + BLOCK_K, last)
            nxt = _weight_fetch(w_rows, k_next, K, FMT, BLOCK_K, TYPE_SIZE, BLOCK_VALUES, EVEN_K)
            w = _weight_decode(
                raw, k0, K, FMT, BLOCK_N, BLOCK_K, BLOCK_VALUES, EVEN_K, INTERPRETED, EXACT
            )
            raw = nxt
        else:
            w = _weight_tile(
                w_rows,
                k0,
                K,
                FMT,
                BLOCK_N,
                BLOCK_K,
                TYPE_SIZE,
                BLOCK_VALUES,
                EVEN_K,
                INTERPRETED,
                EXACT,
            )
        if SWAP_AB:
            acc = _dot(w, tl.trans(xa), acc, EXACT, INTERPRETED)
        else:
            acc = _dot(xa, tl.trans(w), acc, EXACT, INTERPRETED)
    return acc


@triton.jit
def _group_acc(
    acc,
    q,
    ds,
    coef,
    x_rows,
    xs_rows,
    g,
    K,
    x_part,  # EXACT: elements between the bf16 parts of x (hi, mid, lo)
    GROUP_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    EXACT: tl.constexpr,
):
    """acc + group g's products: ds * (Q . x) - coef * sum(x) (_k_loop_quants); past K (EVEN_K
    off) x and its sum are zeros. EXACT: x is fp32 as three bf16 parts whose sum it is, each
    multiplied on the tensor cores (the products of exact Q are exact), so x is not rounded."""
    kx = g * GROUP_VALUES + tl.arange(0, GROUP_VALUES)[None, :]
    if EVEN_K:
        xs = tl.load(xs_rows + g)
    else:
        xs = tl.load(xs_rows + g, mask=g < K // GROUP_VALUES, other=0.0)
    p = tl.zeros_like(acc)
    for part in tl.static_range(3 if EXACT else 1):
        if EVEN_K:
            xg = tl.load(x_rows + part * x_part + kx)
        else:
            xg = tl.load(x_rows + part * x_part + kx, mask=kx < K, other=0.0)
        p = _dot(q, tl.trans(xg), p, False, INTERPRETED)
    return acc + ds * p - coef * xs[None, :]


@triton.jit
def _k_loop_quants(
    acc,  # [BLOCK_N, BLOCK_M] fp32 (out^T)
    x_rows,  # [BLOCK_M, 1] pointers to the bf16 x rows of the tile
    xs_rows,  # [BLOCK_M] pointers to the rows' group sums of x (fp32 [M, K // GROUP_VALUES])
    w_rows,  # [BLOCK_N, 1] byte pointers to the weight rows of the tile
    k_base,
    k_len,
    K,
    x_part,  # EXACT: elements between x's bf16 parts
    K_INTERP: tl.constexpr,
    FMT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    GROUP_VALUES: tl.constexpr,  # 32; Q6_K 16 (the span of its scales)
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    EXACT: tl.constexpr,  # x as three bf16 parts (hi, mid, lo): not rounded
    AHEAD: tl.constexpr = False,  # Q4_K/Q5_K, BLOCK_K 256: the weight bytes a step early
):
    """_k_loop in the quant domain (MatmulConfig.quants): per group of GROUP_VALUES values, the
    weight's integer quants Q (exact in bf16) times the x group on tensor cores, then
    acc += ds * (Q . x) - coef * sum(x) with the group's per-row ds and coef (value = ds * Q -
    coef). No weight value is scaled or rounded to bf16: the products are exact, only x is
    rounded (to bf16, as in _k_loop; EXACT: not at all, see _group_acc). A group past K (EVEN_K
    off) reads group 0 of the row against zeros of x and a zero sum."""
    # A K-quant step is whole super-blocks (the launcher asks BLOCK_K % 256 == 0): each
    # group's place in its super-block is then a constant.
    # Q4_K compiled: the quant bytes as uint32 words, unpacked by inline PTX (dequant.py)
    WORDS: tl.constexpr = FMT == Q4_K and not INTERPRETED
    if AHEAD:  # Q4_K/Q5_K: each step's bytes fetched one step early, in registers
        last_block = (k_base + (K_INTERP if K_INTERP > 0 else k_len) - 1) // 256
        last_block = tl.minimum(last_block, K // 256 - 1)
        raw = _k4_fetch(w_rows + (k_base // 256) * TYPE_SIZE, FMT, WORDS)
    for kk in range(0, K_INTERP if K_INTERP > 0 else k_len, BLOCK_K):
        g0 = (k_base + kk) // GROUP_VALUES  # the step's first group of the row
        if FMT == Q4_K or FMT == Q5_K:
            for sb in tl.static_range(BLOCK_K // 256):  # the super-blocks of the step
                b = g0 // 8 + sb
                if AHEAD:  # a step is one super-block (the launcher asks BLOCK_K == 256)
                    b_next = tl.minimum(b + 1, last_block)
                    nxt = _k4_fetch(w_rows + b_next * TYPE_SIZE, FMT, WORDS)
                else:
                    if not EVEN_K:
                        b = tl.where(b < K // 256, b, 0)
                    raw = _k4_fetch(w_rows + b * TYPE_SIZE, FMT, WORDS)
                for pair in tl.static_range(4):
                    q0, ds0, c0, q1, ds1, c1 = _k4_pair(raw, pair, FMT, WORDS)
                    g = g0 + 8 * sb + 2 * pair
                    acc = _group_acc(
                        acc, q0, ds0, c0, x_rows, xs_rows, g, K, x_part, 32, EVEN_K,
                        INTERPRETED, EXACT,
                    )  # fmt: skip
                    acc = _group_acc(
                        acc, q1, ds1, c1, x_rows, xs_rows, g + 1, K, x_part, 32, EVEN_K,
                        INTERPRETED, EXACT,
                    )  # fmt: skip
                if AHEAD:
                    raw = nxt
        elif FMT == Q6_K:
            for sb in tl.static_range(BLOCK_K // 256):  # the super-blocks of the step
                b = g0 // 16 + sb
                if not EVEN_K:
                    b = tl.where(b < K // 256, b, 0)
                blk = w_rows + b * TYPE_SIZE
                d = _f16_at(blk + 208)
                for hh in tl.static_range(4):  # (h, half): four groups sharing their bytes
                    quad = _q6k_quad(blk, hh // 2, hh % 2, d)
                    for qq in tl.static_range(4):
                        g = g0 + 16 * sb + 2 * (4 * (hh // 2) + qq) + hh % 2
                        acc = _group_acc(
                            acc, quad[3 * qq], quad[3 * qq + 1], quad[3 * qq + 2], x_rows,
                            xs_rows, g, K, x_part, 16, EVEN_K, INTERPRETED, EXACT,
                        )  # fmt: skip
        else:  # a legacy block is one group
            for gi in tl.static_range(BLOCK_K // 32):
                b = g0 + gi
                if not EVEN_K:
                    b = tl.where(b < K // 32, b, 0)
                q, ds, coef = _legacy_quants(w_rows + b * TYPE_SIZE, FMT)
                acc = _group_acc(
                    acc, q, ds, coef, x_rows, xs_rows, g0 + gi, K, x_part, 32, EVEN_K,
                    INTERPRETED, EXACT,
                )  # fmt: skip
    return acc


@triton.jit
def _matmul_kernel(
    x_ptr,  # bf16 (EXACT: f32; EXACT and QUANTS: bf16 [3, M, K]) [M, K], row stride stride_xm
    xs_ptr,  # QUANTS: fp32 [M, K // GROUP_VALUES] group sums of x (bf16 values); else unused
    w_ptr,  # float formats: typed [N, K]; block formats: uint8 [N, row_bytes]
    out_ptr,  # f32 or bf16 [M, N], row stride stride_om, unit stride along N
    M,
    N,
    K,
    stride_xm,
    stride_wn,  # in elements of w_ptr's type
    stride_om,
    k_split,  # values of K a split (program_id(1)) runs: a multiple of BLOCK_K, or K
    stride_os,  # elements between the splits' partial outputs (0: one split)
    K_INTERP: tl.constexpr,  # k_split as a constexpr under TRITON_INTERPRET, else 0 (_k_loop)
    FMT: tl.constexpr,  # format id of kernels/triton/dequant.py
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group of the launch order
    SWAP_AB: tl.constexpr,  # acc^T = W_tile @ x_tile^T (the weight from registers; see top)
    TYPE_SIZE: tl.constexpr,  # bytes per block (block formats)
    BLOCK_VALUES: tl.constexpr,  # values per block: 1 (floats), 32 (legacy), 256 (K-quants)
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K
    INTERPRETED: tl.constexpr,  # under TRITON_INTERPRET (_to_bf16, _dot)
    EXACT: tl.constexpr = False,  # fp32 x and weight tiles, tf32x3 products (_dot)
    PDL: tl.constexpr = False,  # programmatic dependent launch (pdl.py)
    AHEAD: tl.constexpr = False,  # weight loads issued a step early (_k_loop)
    QUANTS: tl.constexpr = False,  # the quant domain (_k_loop_quants; SWAP_AB, block formats)
    GROUP_VALUES: tl.constexpr = 32,  # QUANTS: values a group (Q6_K 16)
):
    if PDL:
        wait_for_inputs()
    # Grouped order: consecutive programs take GROUP_M row tiles down one column of weight
    # tiles before the next column, so a weight tile is read from HBM about once per group.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # 64-bit row offsets: an f32 output projection (151936 x 4096) is 2.5 GB.
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T: the weight rows lead
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pid_k = tl.program_id(1)
    if QUANTS:
        xs_rows = xs_ptr + tl.minimum(rm, M - 1).to(tl.int64) * (K // GROUP_VALUES)
        acc = _k_loop_quants(
            acc, x_rows, xs_rows, w_rows, pid_k * k_split, k_split, K, M * stride_xm, K_INTERP,
            FMT, BLOCK_K, TYPE_SIZE, GROUP_VALUES, EVEN_K, INTERPRETED, EXACT, AHEAD,
        )  # fmt: skip
    else:
        acc = _k_loop(
            acc, x_rows, w_rows, pid_k * k_split, k_split, K, K_INTERP, FMT, BLOCK_N, BLOCK_K,
            TYPE_SIZE, BLOCK_VALUES, EVEN_K, INTERPRETED, EXACT, SWAP_AB, AHEAD,
        )  # fmt: skip
    out_type = out_ptr.dtype.element_ty
    out_ptr += pid_k.to(tl.int64) * stride_os
    if SWAP_AB:
        out = out_ptr + rm.to(tl.int64)[None, :] * stride_om + rn[:, None]
        tl.store(out, acc.to(out_type), mask=(rm[None, :] < M) & (rn[:, None] < N))
    else:
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(out, acc.to(out_type), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dequant_kernel(
    w_ptr,  # float formats: typed [N, K]; block formats: uint8 [N, row_bytes]
    out_ptr,  # bf16 [N, K], row stride stride_on
    N,
    K,
    stride_wn,  # in elements of w_ptr's type
    stride_on,
    FMT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    BLOCK_VALUES: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)): program (i, c) writes the bf16 weight tile
    rows i * BLOCK_N.., values c * BLOCK_K.. (the GEMM's _weight_tile, so both paths round the
    weight to the same bf16 values)."""
    if PDL:
        wait_for_inputs()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
    w = _weight_tile(
        w_rows, k0, K, FMT, BLOCK_N, BLOCK_K, TYPE_SIZE, BLOCK_VALUES, EVEN_K, INTERPRETED
    )
    k = k0 + tl.arange(0, BLOCK_K)[None, :]
    out = out_ptr + rn.to(tl.int64)[:, None] * stride_on + k
    tl.store(out, w, mask=(rn[:, None] < N) & (k < K))

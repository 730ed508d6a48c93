"""Launcher of paged flash-decoding attention (kernels/triton/attention.py): asserts, allocates,
picks a config and the grid.

    attention_decode(q: [B, H, D], k_pool: [S, Hkv, D], v_pool: [S, Hkv, Dv],
                     block_tables: int32 [B, NB], seq_lens: int64 [B], block_size, scale,
                     config=None, pdl=False) -> f32 [B, H, Dv]

Its reference is kiln.ops.reference.attention_decode. The KV cache of a layer is a pool of blocks
of `block_size` rows (S = n_blocks * block_size); sequence b's key/value at position j is pool row
block_tables[b, j // block_size] * block_size + j % block_size, and row b of q attends to
positions 0 .. seq_lens[b] - 1 of its sequence. Table entries past a sequence's blocks are never
read (any value). seq_lens and block_tables stay on the device and are never read here: every
launch parameter follows from the shapes (B, NB, block_size, H, Hkv, D), so one captured CUDA
graph serves every length and every block table. seq_lens[b] >= 1 is the caller's contract (not
checked: that would read the device); a row of length 0 gets no output (its memory is left as
allocated), and lengths past C = NB * block_size are clamped to C. Pools of a block type
(kiln/quant/kv.py's QuantizedRows) are dequantized in the kernel; where they store their rows
rotated, q comes rotated like K (from qkv_norm_rope) and the output is rotated back like V.

How the work is split. Stage 1 runs Hkv x P x B programs; program (h, p, b) reads KV head h for
all its query heads of row b over the p-th slice of the row's first seq_lens[b] positions. P is
fixed from the shapes, with the capacity C = NB * block_size of a table row:
    P = min(ceil(C / min_slice), ceil(programs / Hkv))
and each row's slice size is chosen on the device from its length:
    slice = max(min_slice, ceil(length / P) rounded up to block_s)
so a short context uses ceil(length / min_slice) programs per KV head, each reading whole slices
(little waste in partial steps, few partial results to combine), and a long one spreads over all
Hkv * P ~ `programs` programs, enough to fill the GPU (132 SMs on an H100) at any capacity C. A
slice size fixed from C instead (slice = C / P) would give a 40960-row table only one program per
KV head up to length 640, where this gives ceil(length / 256). Programs past the last active slice
of their row load the length and q and store nothing; the combine kernel (grid H x B) reads only
each row's active slices. A step reads block_s = min(config.block_s, block_size) keys: with both
powers of two, a step lies inside one block, so it costs one block-table load (a scalar) and reads
contiguous pool rows, as a contiguous cache would.

Scratch (the partial outputs, [B, P, H, Dv] + [B, P, H] f32) and the output are allocated per call
by shape, which is fine inside a CUDA-graph capture (the graph's pool). Two launches per call:
merging in the last program of each KV head instead (an atomic counter) was measured slower on
an H100 (docs/performance.md, "Tried and dropped"); when one slice covers a row's length, the
attention kernel writes that row's output and the merge kernel returns at once for it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from kiln.kernels import cdiv, next_power_of_2, pdl_launch
from kiln.kernels.kv_cache import FLOAT_DTYPES, KV_FLOAT, kv_operand
from kiln.kernels.triton import attention as _k

DTYPES = FLOAT_DTYPES  # of q, and of a float pool
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._attention_decode_kernel).__name__ == "InterpretedFunction"
_H100_SMS = 132
MAX_GROUP = 16  # query heads per KV head: one 16-row MMA tile (groups > 16 are untested)
MAX_HEAD_DIM = 256
MAX_COMBINE_CHUNK = 128  # slices the combine kernel loads at once (all of them up to here)


@dataclass(frozen=True)
class AttentionConfig:
    block_s: int = 64  # keys per loop step (power of 2, >= 16; capped at the block size)
    min_slice: int = 256  # fewest keys per program (a multiple of block_s)
    programs: int = 4 * _H100_SMS  # Hkv * P target at long lengths
    num_warps: int = 4
    num_stages: int = 3  # K/V steps in flight + 1, as in an unpaged loop (see _triton_stages)
    # block-type pools: each step's loads issued one step ahead in registers (Triton's
    # pipeliner leaves loads that are dequantized before the MMAs unpipelined)
    ahead: bool = True
    # registers capped so that all `programs` fit on the SMs at once (wave_registers): at long
    # lengths every program then runs in one wave; off, the compiler's choice (on sm_90 146
    # registers for f16 and 147 for q8_0 at D = 128: 3 programs of 4 warps an SM where the
    # launch gives 4, so 4/3 waves). Not yet timed on a GPU (benchmarks/attention.py --fit-wave)
    fit_wave: bool = False


def default_config(device: torch.device, quantized: bool = False) -> AttentionConfig:
    """4 programs per SM at long lengths. quantized (a block-type pool, K or V): steps of 32
    keys and slices of as few, where benchmarks/attention.py --sweep found the best time for
    q8_0 and q4_0 at 1024 keys (H100, qwen3-8b's heads: 10.2 and 9.6 us against 15.3 and 14.1
    with 64 / 256: slices of 256 keys gave a 1024-key row 4 programs a KV head, 32 on 132 SMs)
    and steps of 32 the best at 16384 for q8_0 (33.6 against 38.3 us); the f16 default is
    session 13's sweep's."""
    if quantized:
        return AttentionConfig(block_s=32, min_slice=32, programs=4 * sm_count(device))
    return AttentionConfig(programs=4 * sm_count(device))


def sm_count(device: torch.device) -> int:
    """The device's SMs (an H100's 132 where there is no GPU: the interpreter, sm_90 compiles)."""
    return _sm_count(device.index) if device.type == "cuda" else _H100_SMS


def n_slices(capacity: int, n_kv: int, config: AttentionConfig) -> int:
    """P, the programs per KV head and row (grid axis 1), from the shapes only; capacity is a
    table row's C = NB * block_size."""
    return max(1, min(cdiv(capacity, config.min_slice), cdiv(config.programs, n_kv)))


REGISTERS_PER_SM = 65536  # sm_80 .. sm_90


def wave_registers(config: AttentionConfig, sms: int) -> int:
    """Registers a thread may use for config.programs programs of config.num_warps warps to be
    resident on `sms` SMs at once (a multiple of 8, at most 255; at least 64)."""
    per_sm = cdiv(config.programs, sms)
    regs = REGISTERS_PER_SM // (per_sm * config.num_warps * 32) // 8 * 8
    return max(64, min(255, regs))


def wave_launch(config: AttentionConfig, device: torch.device) -> dict[str, int]:
    """The decode kernel's maxnreg launch option where config.fit_wave asks for it (compiled
    kernels only: the interpreter has no registers)."""
    if not config.fit_wave or _INTERPRETED:
        return {}
    return {"maxnreg": wave_registers(config, sm_count(device))}


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_stages(num_stages: int) -> int:
    """Triton's num_stages for config.num_stages = n. The block-table load feeds the K/V loads,
    and Triton's pipeliner (AssignLatencies) splits num_stages - 1 evenly between the levels of
    such a chain of loads: (num_stages - 1) // 2 each here. 2n - 1 keeps n - 1 K/V steps in
    flight (the block-table entries run n - 1 steps further ahead), what n gave the unpaged
    kernel: compiled for sm_90 with n = 3, K and V are double-buffered in shared memory (78 KB at
    D = 128, f16, as before), where passing 3 single-buffers them (45 KB). Not yet timed on a
    GPU against passing n."""
    return 2 * num_stages - 1


def check_paged(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    rows: str,
) -> Paged:
    """The checks every attention launcher over the paged pool makes of q [rows, H, D], the
    pools [S, Hkv, D] / [S, Hkv, Dv] (float tensors, or a block type's QuantizedRows:
    kiln/kernels/kv_cache.py) and the block tables [B, NB] -> Paged: (H, Hkv, D, Dv) and the
    pools as the kernels take them."""
    assert q.dim() == 3, f"q must be [{rows}, H, D]; got {tuple(q.shape)}"
    assert len(k_pool.shape) == 3 and len(v_pool.shape) == 3, (
        f"pools must be [S, Hkv, D]; got {tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
    )
    _, n_head, head_dim = q.shape
    n_slots, n_kv, _ = k_pool.shape
    dv = v_pool.shape[2]
    assert k_pool.shape[2] == head_dim, f"q has D={head_dim}, k_pool D={k_pool.shape[2]}"
    assert v_pool.shape[:2] == k_pool.shape[:2], (
        f"v_pool {tuple(v_pool.shape)} does not match k_pool {tuple(k_pool.shape)}"
    )
    # (K's rotated rows need nothing here: q comes rotated like them, from qkv_norm_rope)
    k, k_fmt, _ = kv_operand(k_pool, n_kv, head_dim, "k_pool")
    v, v_fmt, v_rot = kv_operand(v_pool, n_kv, dv, "v_pool")
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous(), (
        "q, k_pool and v_pool must be contiguous"
    )
    assert q.dtype in DTYPES, f"q must be f16/bf16/f32; got {q.dtype}"
    assert k_fmt != KV_FLOAT or v_fmt != KV_FLOAT or v.dtype == k.dtype, (
        f"float pools must share one dtype of f16/bf16/f32; got {k.dtype}, {v.dtype}"
    )
    assert n_head % n_kv == 0, f"H={n_head} is not a multiple of Hkv={n_kv}"
    assert head_dim <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM, (
        f"head sizes up to {MAX_HEAD_DIM}; got D={head_dim}, Dv={dv}"
    )
    assert block_size >= 16 and block_size & (block_size - 1) == 0, (
        f"block_size must be a power of 2 >= 16; got {block_size}"
    )
    assert n_slots % block_size == 0, (
        f"the pools hold {n_slots} rows, not a whole number of blocks of {block_size}"
    )
    assert block_tables.dim() == 2 and block_tables.shape[1] >= 1, (
        f"block_tables must be [B, NB] with NB >= 1; got {tuple(block_tables.shape)}"
    )
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1, (
        f"block_tables must be int32 with contiguous rows; got {block_tables.dtype} "
        f"strides {block_tables.stride()}"
    )
    return Paged(n_head, n_kv, head_dim, dv, k, k_fmt, v, v_fmt, v_rot)


@dataclass(frozen=True)
class Paged:
    """check_paged's result: the head counts and sizes, each pool as its kernel takes it (the
    tensor, its K_FMT / V_FMT id), and whether V's rows are stored rotated (kiln/quant/kv.py:
    the kernels rotate the output back, V_ROT)."""

    n_head: int
    n_kv: int
    head_dim: int
    dv: int
    k: torch.Tensor
    k_fmt: int
    v: torch.Tensor
    v_fmt: int
    v_rot: bool = False

    @property
    def products_dtype(self) -> torch.dtype:
        """The dtype K, V (and the softmax weights) enter the MMAs in: the float pool's (K's and
        V's share one), the float pool's beside a block type (its values rounded to it), f16
        for two block types (as llama.cpp's kernels read q8_0 / q4_0 blocks: the rounding,
        2^-12 of a value at most, is far below the blocks' own)."""
        floats = [
            t.dtype for t, fmt in ((self.k, self.k_fmt), (self.v, self.v_fmt)) if fmt == KV_FLOAT
        ]
        return floats[0] if floats else torch.float16

    @property
    def precision(self) -> str:
        """tl.dot's input_precision for fp32 operands: "ieee" for f32 pools and under the
        interpreter, "tf32x3" (three TF32 products: about fp32's accuracy on tensor cores) for a
        block type beside an f32 pool; f16/bf16 operands ignore it."""
        if _INTERPRETED or (self.k_fmt == KV_FLOAT and self.v_fmt == KV_FLOAT):
            return "ieee"
        return "tf32x3"


def attention_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    config: AttentionConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """q: [B, H, D], row b attending to positions 0..seq_lens[b]-1 of sequence b in the paged
    k_pool/v_pool ([S, Hkv, D] / [S, Hkv, Dv]; blocks block_tables[b] of block_size rows)
    -> f32 [B, H, Dv]."""
    paged = check_paged(q, k_pool, v_pool, block_tables, block_size, "B")
    n_head, n_kv, head_dim, dv = paged.n_head, paged.n_kv, paged.head_dim, paged.dv
    n_rows = q.shape[0]
    group = n_head // n_kv
    assert group <= MAX_GROUP, f"at most {MAX_GROUP} query heads per KV head; got {group}"
    assert block_tables.shape[0] == n_rows, (
        f"block_tables must be [B={n_rows}, NB]; got {tuple(block_tables.shape)}"
    )
    assert seq_lens.dtype == torch.int64 and tuple(seq_lens.shape) == (n_rows,), (
        f"seq_lens must be int64 [B={n_rows}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}"
    )
    dev = q.device
    assert k_pool.device == v_pool.device == dev, (
        f"q on {dev}, pools on {k_pool.device}/{v_pool.device}"
    )
    assert block_tables.device == seq_lens.device == dev, (
        f"q on {dev}, block_tables on {block_tables.device}, seq_lens on {seq_lens.device}"
    )
    cfg = config or default_config(dev, KV_FLOAT != paged.k_fmt or KV_FLOAT != paged.v_fmt)
    assert cfg.block_s >= 16 and cfg.block_s & (cfg.block_s - 1) == 0, "block_s: a power of 2"
    assert cfg.min_slice % cfg.block_s == 0, "min_slice must be a multiple of block_s"

    n_blocks = block_tables.shape[1]
    capacity = n_blocks * block_size
    block_s = min(cfg.block_s, block_size)  # a step stays inside one block
    p = n_slices(capacity, n_kv, cfg)
    out = torch.empty((n_rows, n_head, dv), dtype=torch.float32, device=dev)
    if n_rows == 0:
        return out
    part_o = torch.empty((n_rows, p, n_head, dv), dtype=torch.float32, device=dev)
    part_lse = torch.empty((n_rows, p, n_head), dtype=torch.float32, device=dev)
    dv_pad = max(16, next_power_of_2(dv))
    # The combine is latency bound: load every active slice in one step where P allows.
    chunk = min(MAX_COMBINE_CHUNK, next_power_of_2(p))
    if _INTERPRETED:  # the largest slice (at length == C); see the kernel's loop
        per = cdiv(cdiv(capacity, p), block_s) * block_s
        interp_slice = max(cfg.min_slice, per)
        interp_p = cdiv(p, chunk) * chunk
    else:
        interp_slice = interp_p = 0
    _k._attention_decode_kernel[(n_kv, p, n_rows)](
        q,
        paged.k,
        paged.v,
        block_tables,
        seq_lens,
        part_o,
        part_lse,
        out,
        scale * math.log2(math.e),
        n_blocks,
        block_tables.stride(0),
        p,
        n_head,
        paged.k.stride(0),
        paged.v.stride(0),
        GROUP=group,
        G_PAD=max(16, next_power_of_2(group)),
        D=head_dim,
        D_PAD=max(16, next_power_of_2(head_dim)),
        DV=dv,
        DV_PAD=dv_pad,
        BLOCK_S=block_s,
        KV_BLOCK=block_size,
        MIN_SLICE=cfg.min_slice,
        DT=TL_DTYPES[paged.products_dtype],
        SPLIT=paged.products_dtype != torch.float32,
        PRECISION=paged.precision,
        INTERP_SLICE=interp_slice,
        K_FMT=paged.k_fmt,
        V_FMT=paged.v_fmt,
        V_ROT=paged.v_rot,
        AHEAD=cfg.ahead and (paged.k_fmt != KV_FLOAT or paged.v_fmt != KV_FLOAT),
        **wave_launch(cfg, dev),
        num_warps=cfg.num_warps,
        num_stages=_triton_stages(cfg.num_stages),
        **pdl_launch(pdl),
    )
    _k._attention_decode_combine_kernel[(n_head, n_rows)](
        part_o,
        part_lse,
        out,
        seq_lens,
        capacity,
        p,
        n_head,
        DV=dv,
        DV_PAD=dv_pad,
        BLOCK_S=block_s,
        MIN_SLICE=cfg.min_slice,
        CHUNK=chunk,
        INTERP_P=interp_p,
        V_ROT=paged.v_rot,
        num_warps=max(1, min(8, chunk * dv_pad // 1024)),
        **pdl_launch(pdl),
    )
    return out

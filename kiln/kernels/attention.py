"""Launcher of flash-decoding attention (kernels/triton/attention.py): asserts, allocates, picks a
config and the grid.

    attention_decode(q: [1, H, D], k_cache: [C, Hkv, D], v_cache: [C, Hkv, Dv], length: int64 [1],
                     scale) -> f32 [1, H, Dv]

Its reference is kiln.ops.reference.attention_decode. `length` stays on the device and is never
read here: every launch parameter follows from the shapes (C included), so one captured CUDA graph
serves every position.

How the work is split. Stage 1 runs Hkv x P programs; program (h, p) reads KV head h for all its
query heads over the p-th slice of the first `length` rows. P is fixed from the shapes:
    P = min(ceil(C / min_slice), ceil(programs / Hkv))
and the slice size is chosen on the device from `length`:
    slice = max(min_slice, ceil(length / P) rounded up to block_s)
so a short context uses ceil(length / min_slice) programs per KV head, each reading whole slices
(little waste in partial blocks, few partial results to combine), and a long one spreads over all
Hkv * P ~ `programs` programs, enough to fill the GPU (132 SMs on an H100) at any capacity C. A
slice size fixed from C instead (slice = C / P) would give a 40960-row cache only one program per
KV head up to length 640, where this gives ceil(length / 256). Programs past the last active slice
load `length` and q and store nothing; the combine kernel (grid H) reads only the active slices.

Scratch (the partial outputs, [P, H, Dv] + [P, H] f32) and the output are allocated per call by
shape, which is fine inside a CUDA-graph capture (the graph's pool). Two launches per call:
merging in the last program of each KV head instead (an atomic counter) was measured slower on
an H100 (docs/performance.md, "Tried and dropped"); when one slice covers the length, the
attention kernel writes the output and the merge kernel returns at once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from kiln.kernels import pdl_launch
from kiln.kernels.triton import attention as _k

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Under TRITON_INTERPRET=1 (CPU tests) @triton.jit gives an InterpretedFunction.
_INTERPRETED = type(_k._attention_decode_kernel).__name__ == "InterpretedFunction"
_H100_SMS = 132
MAX_GROUP = 16  # query heads per KV head: one 16-row MMA tile (groups > 16 are untested)
MAX_HEAD_DIM = 256
MAX_COMBINE_CHUNK = 128  # slices the combine kernel loads at once (all of them up to here)


@dataclass(frozen=True)
class AttentionConfig:
    block_s: int = 64  # keys per loop step (power of 2, >= 16)
    min_slice: int = 256  # fewest keys per program (a multiple of block_s)
    programs: int = 4 * _H100_SMS  # Hkv * P target at long lengths
    num_warps: int = 4
    num_stages: int = 3


def default_config(device: torch.device) -> AttentionConfig:
    """Untuned: 4 programs per SM at long lengths; benchmarks/attention.py --sweep measures the
    alternatives on a GPU."""
    return _default_config(device.type, device.index)


@functools.cache
def _default_config(kind: str, index: int | None) -> AttentionConfig:
    sms = _H100_SMS
    if kind == "cuda":
        sms = torch.cuda.get_device_properties(index).multi_processor_count
    return AttentionConfig(programs=4 * sms)


def n_slices(capacity: int, n_kv: int, config: AttentionConfig) -> int:
    """P, the programs per KV head (grid axis 1), from the shapes only."""
    return max(1, min(triton.cdiv(capacity, config.min_slice), triton.cdiv(config.programs, n_kv)))


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor,
    scale: float,
    config: AttentionConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """q: [1, H, D] attends to k_cache/v_cache rows 0..length-1 -> f32 [1, H, Dv]."""
    assert q.dim() == 3 and q.shape[0] == 1, f"q must be [1, H, D]; got {tuple(q.shape)}"
    assert k_cache.dim() == 3 and v_cache.dim() == 3, (
        f"caches must be [C, Hkv, D]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
    )
    _, n_head, head_dim = q.shape
    capacity, n_kv, _ = k_cache.shape
    dv = v_cache.shape[2]
    assert k_cache.shape[2] == head_dim, f"q has D={head_dim}, k_cache D={k_cache.shape[2]}"
    assert v_cache.shape[:2] == k_cache.shape[:2], (
        f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}"
    )
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous(), (
        "q, k_cache and v_cache must be contiguous"
    )
    assert q.dtype in _DTYPES, f"q must be f16/bf16/f32; got {q.dtype}"
    assert k_cache.dtype in _DTYPES and v_cache.dtype == k_cache.dtype, (
        f"caches must share one dtype of f16/bf16/f32; got {k_cache.dtype}, {v_cache.dtype}"
    )
    assert n_head % n_kv == 0, f"H={n_head} is not a multiple of Hkv={n_kv}"
    group = n_head // n_kv
    assert group <= MAX_GROUP, f"at most {MAX_GROUP} query heads per KV head; got {group}"
    assert head_dim <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM, (
        f"head sizes up to {MAX_HEAD_DIM}; got D={head_dim}, Dv={dv}"
    )
    assert length.dtype == torch.int64 and length.numel() == 1, (
        f"length must be an int64 tensor of one element; got {length.dtype} {tuple(length.shape)}"
    )
    assert q.device == k_cache.device == v_cache.device == length.device, (
        f"q on {q.device}, caches on {k_cache.device}/{v_cache.device}, length on {length.device}"
    )
    cfg = config or default_config(q.device)
    assert cfg.block_s >= 16 and cfg.block_s & (cfg.block_s - 1) == 0, "block_s: a power of 2"
    assert cfg.min_slice % cfg.block_s == 0, "min_slice must be a multiple of block_s"

    p = n_slices(capacity, n_kv, cfg)
    part_o = torch.empty((p, n_head, dv), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((p, n_head), dtype=torch.float32, device=q.device)
    out = torch.empty((1, n_head, dv), dtype=torch.float32, device=q.device)
    dv_pad = max(16, triton.next_power_of_2(dv))
    # The combine is latency bound: load every active slice in one step where P allows.
    chunk = min(MAX_COMBINE_CHUNK, triton.next_power_of_2(p))
    if _INTERPRETED:  # the largest slice (at length == C); see the kernel's loop
        per = triton.cdiv(triton.cdiv(capacity, p), cfg.block_s) * cfg.block_s
        interp_slice = max(cfg.min_slice, per)
        interp_p = triton.cdiv(p, chunk) * chunk
    else:
        interp_slice = interp_p = 0
    _k._attention_decode_kernel[(n_kv, p)](
        q,
        k_cache,
        v_cache,
        length,
        part_o,
        part_lse,
        out,
        scale * math.log2(math.e),
        capacity,
        p,
        n_head,
        k_cache.stride(0),
        v_cache.stride(0),
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        DV=dv,
        DV_PAD=dv_pad,
        BLOCK_S=cfg.block_s,
        MIN_SLICE=cfg.min_slice,
        SPLIT=k_cache.dtype != torch.float32,
        PRECISION="ieee" if k_cache.dtype == torch.float32 or _INTERPRETED else "tf32",
        INTERP_SLICE=interp_slice,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_launch(pdl),
    )
    _k._attention_decode_combine_kernel[(n_head,)](
        part_o,
        part_lse,
        out,
        length,
        capacity,
        p,
        n_head,
        DV=dv,
        DV_PAD=dv_pad,
        BLOCK_S=cfg.block_s,
        MIN_SLICE=cfg.min_slice,
        CHUNK=chunk,
        INTERP_P=interp_p,
        num_warps=max(1, min(8, chunk * dv_pad // 1024)),
        **pdl_launch(pdl),
    )
    return out

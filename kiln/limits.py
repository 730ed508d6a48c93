"""Sizes a user gives, checked against what the machine has before the work that needs them:
memory for KV caches and models built in memory, the model's context for token counts.

Each check raises a UsageError that names the size, the limit and the fix. Memory estimates
count the big allocations only (weights, KV cache), so they are lower bounds: a check never
refuses what would fit, and catches the sizes that cannot (`kiln bench -d 100000000` used to
allocate until the kernel killed it, 49 s in).
"""

from __future__ import annotations

import os

import torch

from kiln.errors import UsageError


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device`, or None when unknown.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused. CPU:
    MemAvailable of /proc/meminfo (the kernel's estimate of what can be allocated without
    swapping), else the free physical pages."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free + max(cached, 0))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_memory(need: int, device: torch.device | str, what: str, fix: str) -> None:
    """UsageError when `need` bytes are more than `device` has free. `what` names the
    allocation ("a KV cache of 100000 tokens"), `fix` says what to change."""
    free = free_memory(device)
    if free is None or need <= free:
        return
    raise UsageError(
        f"{what} needs {gib(need)}, but only {gib(free)} of memory is free on {device}: {fix}"
    )


def kv_cache_bytes(config, n_tokens: int, k_type=torch.float32, v_type=None) -> int:
    """Bytes of a KV cache of n_tokens positions (K and V of every layer); k_type / v_type: the
    cache types (a float dtype, a name or a kiln.quant.kv.KVCacheType; V: K's when None)."""
    from kiln.quant.kv import cache_type

    k = cache_type(k_type)
    v = k if v_type is None else cache_type(v_type)
    per_token = config.n_head_kv * (k.row_bytes(config.head_dim) + v.row_bytes(config.head_dim_v))
    return n_tokens * config.n_layer * per_token


def check_context(n_tokens: int, n_ctx_train: int, what: str, fix: str) -> None:
    """UsageError when n_tokens (the context a run needs) is more than the model was trained
    on: the positions past it are untested (RoPE extrapolation), and the cache that size may not
    fit."""
    if n_tokens > n_ctx_train:
        raise UsageError(
            f"{what} needs a context of {n_tokens} tokens, more than the {n_ctx_train} the model "
            f"was trained on: {fix}"
        )

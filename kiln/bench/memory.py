"""The memory floor of decoding (DESIGN.md, performance model).

Decode at batch 1 reads every weight once per token, so bytes of weights read per token divided
by the memory bandwidth is the shortest a token can take. The bandwidth is measured in the same
run, with a copy: on CUDA a device-to-device copy of 1 GiB timed with events (about 3.0 TB/s on
an H100), on the CPU a clone of a large tensor. A copy reads and writes each byte, so its
bandwidth counts both: bytes read + bytes written over the time.

Then, for a tg test at t tokens/s:  achieved GB/s = bytes_per_token x t / 1e9, and
% of floor = achieved / measured copy bandwidth.

On the CPU the torch reference path reads float32 copies of the weights (4 bytes per value, not
the quantized bytes counted here), so there the percentage says how far the reference is from
what a kernel on quantized blocks could do, not how well it uses the memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from kiln.gguf.model import GGUFModel

CUDA_COPY_BYTES = 1 << 30  # 1 GiB: long enough (~0.7 ms on an H100) that launch cost is noise
CPU_COPY_BYTES = 1 << 28  # 256 MiB: beyond every CPU cache, and quick on a small machine
COPY_REPS = 5  # the best of these is reported (the others met interference)


def bytes_per_token(
    tensors: Iterable[tuple[str, int, tuple[int, ...]]],
    tied_output: bool,
    n_expert: int = 0,
    n_expert_used: int = 0,
) -> int:
    """Bytes of weights read to decode one token.

    tensors: (name, bytes in the file, shape in torch order) of every tensor. Each is read once,
    except token_embd, of which one row is read (the token's embedding) unless the output
    projection is tied to it (then all of it, as the output), and the stacked MoE experts
    (`*_exps.weight`), of which n_expert_used of n_expert are read. Pure: no model needed.
    """
    total = 0
    for name, nbytes, shape in tensors:
        if name == "token_embd.weight" and not tied_output:
            total += nbytes // shape[0]  # one row
        elif "_exps." in name and n_expert:
            total += nbytes // n_expert * n_expert_used
        else:
            total += nbytes
    return total


def model_bytes_per_token(model: GGUFModel) -> int:
    c = model.config
    return bytes_per_token(
        ((t.name, t.nbytes, tuple(t.shape)) for t in model.tensors.values()),
        tied_output=c.tied_output,
        n_expert=c.n_expert,
        n_expert_used=c.n_expert_used,
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a clock read before it would time the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = COPY_REPS) -> float:
    """Measured copy bandwidth of `device` in bytes/s (read + written), the best of `reps`."""
    if nbytes is None:
        nbytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and allocation are not bandwidth
    best = float("inf")
    if device.type == "cuda":
        with torch.cuda.device(device):  # events are recorded on the current device's stream
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            for _ in range(reps):
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / best


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes allocated at most since the last reset (torch.cuda.max_memory_allocated); None on
    the CPU, where torch keeps no such count."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None

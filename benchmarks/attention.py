"""Micro-benchmark of kiln.kernels.attention.attention_decode (flash-decoding, batch 1): time per
call and GB/s of K/V read against the cache length, and % of a device-to-device copy (the
achievable HBM bandwidth). Not run by CI; needs a CUDA device.

    python benchmarks/attention.py [--heads 32,8,128] [--capacity 40960] [--dtype bf16]
                                   [--lengths 128,512,...] [--sweep] [--sdpa]

Each time is of calls replayed from one CUDA graph (as the decode step runs; a Python launch
costs more than the kernel at short lengths), timed with torch.cuda.Event. The calls of one replay
read disjoint caches (views at different rows of one buffer, like the layers of a model), at least
4x the L2 cache in all, so K/V come from HBM. GB/s counts K and V rows 0..length-1 only (not q,
the partial results or the output).
--sweep times a grid of launch configs at every length and prints the best per length.
--sdpa also times torch's scaled_dot_product_attention on the same rows (host-known length, a
slice of the cache; enable_gqa) as a baseline.
"""

from __future__ import annotations

import argparse
import math

import torch

from kiln.kernels import attention as att
from kiln.ops.reference import attention_decode as reference

LENGTHS = "128,256,512,1024,2048,4096,8192,16384,32768"
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
L2_BYTES = 50 << 20  # H100: 50 MB
# (block_s, min_slice, programs per SM, num_warps, num_stages); the first is the default.
SWEEP = (
    (64, 256, 4, 4, 2),
    (64, 256, 4, 4, 3),
    (64, 256, 4, 4, 4),
    (64, 256, 2, 4, 3),
    (64, 256, 8, 4, 3),
    (64, 128, 4, 4, 3),
    (64, 64, 4, 4, 3),
    (32, 64, 4, 4, 3),
    (64, 512, 4, 4, 3),
    (32, 128, 4, 4, 3),
    (32, 256, 4, 4, 4),
    (128, 256, 4, 4, 2),
    (128, 256, 4, 8, 2),
    (128, 256, 4, 8, 3),
    (128, 512, 4, 8, 3),
    (128, 512, 8, 8, 2),
    (64, 64, 4, 4, 2),
    (64, 64, 8, 4, 2),
    (64, 128, 4, 4, 2),
    (32, 64, 4, 4, 2),
    (32, 32, 8, 4, 2),
)


def _time_us(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median over `iters` timed runs of fn (itself a graph replay of many calls), in us."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src))
    return 2 * nbytes / us / 1e3


class Caches:
    """n views [C, Hkv, D] of one K and one V buffer, view i starting at row i * length: the
    rows a call reads (0..length-1) are disjoint between views."""

    def __init__(self, n_kv: int, d: int, capacity: int, length: int, dtype: torch.dtype):
        row_bytes = 2 * n_kv * d * dtype.itemsize
        self.n = max(2, math.ceil(4 * L2_BYTES / (length * row_bytes)))
        rows = capacity + (self.n - 1) * length
        self.k = torch.randn(rows, n_kv, d, device="cuda").to(dtype)
        self.v = torch.randn(rows, n_kv, d, device="cuda").to(dtype)
        self.length = length

    def view(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.length
        end = start + self.k.shape[0] - (self.n - 1) * self.length  # capacity rows
        return self.k[start:end], self.v[start:end]


def _graph_us(call, caches: Caches) -> float:
    """us per call: one graph holding a call on every view, replayed."""
    call(*caches.view(0))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(caches.n):
            call(*caches.view(i))
    return _time_us(graph.replay) / caches.n


def bench_length(args, q: torch.Tensor, length: int, copy: float, sms: int) -> None:
    """One output line (and the sweep's) for one cache length."""
    n_kv, d = int(args.heads.split(",")[1]), q.shape[2]
    dtype = DTYPES[args.dtype]
    caches = Caches(n_kv, d, args.capacity, length, dtype)
    n = torch.tensor([length], device="cuda")
    scale = d**-0.5
    kv_bytes = length * n_kv * 2 * d * dtype.itemsize
    k0, v0 = caches.view(0)
    y = att.attention_decode(q, k0, v0, n, scale)
    err = (y - reference(q, k0[:length], v0[:length], n, scale)).abs().max().item()
    assert err < 1e-3, f"length {length}: max error {err}"

    def ours(k, v, cfg=None):
        att.attention_decode(q, k, v, n, scale, cfg)

    us = _graph_us(ours, caches)
    gbps = kv_bytes / us / 1e3
    line = f"{length:>7} {us:8.2f} {gbps:7.0f} {100 * gbps / copy:6.1f}%"
    if args.sdpa:
        qs = q.to(dtype).transpose(0, 1)  # [H, 1, D]

        def sdpa(k, v):
            torch.nn.functional.scaled_dot_product_attention(
                qs,
                k[:length].transpose(0, 1),
                v[:length].transpose(0, 1),
                scale=scale,
                enable_gqa=True,
            )

        try:
            s_us = _graph_us(sdpa, caches)
            line += f" {s_us:8.2f} {kv_bytes / s_us / 1e3:9.0f}"
        except (RuntimeError, TypeError) as e:  # enable_gqa needs torch >= 2.5
            line += f"  sdpa failed: {str(e).splitlines()[0][:60]}"
    print(line, flush=True)
    if args.sweep:
        times = {}
        for b, s, per_sm, w, st in SWEEP:
            cfg = att.AttentionConfig(b, s, per_sm * sms, w, st)
            times[(b, s, per_sm, w, st)] = _graph_us(lambda k, v, cfg=cfg: ours(k, v, cfg), caches)
        best = min(times, key=times.get)
        row = "  ".join("/".join(map(str, c)) + f":{t:.1f}" for c, t in times.items())
        print(f"  sweep (block_s/min_slice/programs per SM/warps/stages:us) {row}")
        print(f"  best {best}: {times[best]:.2f} us, {kv_bytes / times[best] / 1e3:.0f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="32,8,128", help="H,Hkv,D (qwen3-8b, llama3-8b)")
    ap.add_argument("--capacity", type=int, default=40960, help="cache rows C")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--lengths", default=LENGTHS)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sdpa", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks/attention.py needs a CUDA device"
    torch.manual_seed(0)
    n_head, n_kv, d = (int(v) for v in args.heads.split(","))
    copy = copy_gbps()
    dev = torch.device("cuda")
    default = att.default_config(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s")
    print(
        f"H={n_head} Hkv={n_kv} D={d} C={args.capacity} {args.dtype}; default {default}, "
        f"P={att.n_slices(args.capacity, n_kv, default)}"
    )
    q = torch.randn(1, n_head, d, device="cuda")
    head = f"{'length':>7} {'us':>8} {'GB/s':>7} {'% copy':>7}"
    print(head + ("  sdpa us  sdpa GB/s" if args.sdpa else ""))
    for length in (int(v) for v in args.lengths.split(",")):
        if length <= args.capacity:
            bench_length(args, q, length, copy, sms)


if __name__ == "__main__":
    main()

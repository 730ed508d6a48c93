"""Micro-benchmark of kiln.kernels.attention.attention_decode (paged flash-decoding): time per
call and GB/s of K/V read against the sequence length, and % of a device-to-device copy (the
achievable HBM bandwidth). Not run by CI; needs a CUDA device.

    python benchmarks/attention.py [--heads 32,8,128] [--capacity 40960] [--dtype bf16|q8_0|...]
                                   [--lengths 128,512,...] [-B 1] [--block-size 64] [--shuffle]
                                   [--no-ahead] [--fit-wave] [--sweep] [--sdpa]

Each call is a batch of B rows (-B, default 1), every row of the same length, each over its own
blocks of a paged pool (--block-size rows per block; table rows of capacity / block-size
entries). Each time is of calls replayed from one CUDA graph (as the decode step runs; a Python
launch costs more than the kernel at short lengths), timed with torch.cuda.Event. The calls of
one replay read disjoint blocks of one pool (like the layers of a model), at least 4x the L2
cache in all, so K/V come from HBM. Blocks are handed out in pool order (a fresh pool);
--shuffle permutes them. GB/s counts the K and V rows of positions 0..length-1 of the B rows only
(not q, the tables, the partial results or the output).
--dtype is the cache type (-ctk/-ctv): f32, f16, bf16, or q8_0 / q4_0 blocks that the kernel
dequantizes (GB/s then counts the blocks' bytes, scales included; rows stored rotated as a model
stores them, which changes what the kernel reads, not how much).
--no-ahead times block-type pools with their loads not issued a step ahead (the kernel's AHEAD).
--fit-wave caps the kernel's registers so that every program of a long length is resident at
once (AttentionConfig.fit_wave: 128 a thread for 4 programs of 4 warps an SM).
--sweep times a grid of launch configs at every length and prints the best per length.
--sdpa also times torch's scaled_dot_product_attention on the same rows gathered contiguous
(host-known length; enable_gqa) as a baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from kiln.kernels import attention as att
from kiln.ops.reference import attention_decode as reference
from kiln.quant.kv import CACHE_TYPES, write_rows

LENGTHS = "128,256,512,1024,2048,4096,8192,16384,32768"
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
    # more warps per program: block-type pools spend a step's time dequantizing in registers
    (64, 256, 4, 8, 3),
    (64, 256, 2, 8, 3),
    (32, 256, 4, 8, 3),
    (64, 128, 4, 8, 3),
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


class Pools:
    """One K and one V pool of blocks; `n` batches of B block tables [B, capacity / block_size],
    batch i's rows owning disjoint blocks (the rows a call reads are disjoint between calls);
    entries past a row's blocks point at block 0."""

    def __init__(self, args, n_kv: int, d: int, length: int):
        bs, b = args.block_size, args.batch
        kind = CACHE_TYPES[args.dtype]
        row_bytes = 2 * n_kv * kind.row_bytes(d)
        need = -(-length // bs)  # blocks per row
        self.n = max(2, math.ceil(4 * L2_BYTES / (b * need * bs * row_bytes)))
        n_blocks = self.n * b * need
        rows = torch.arange(n_blocks * bs, device="cuda")
        self.k, self.v = (kind.allocate(len(rows), n_kv, d, rows.device) for _ in range(2))
        for pool in (self.k, self.v):
            for chunk in rows.split(1 << 16):  # the quantized write's float32 temporaries
                write_rows(pool, chunk, torch.randn(len(chunk), n_kv, d, device="cuda"))
        self.row_bytes = row_bytes
        order = torch.randperm(n_blocks) if args.shuffle else torch.arange(n_blocks)
        owned = order.view(self.n, b, need).to(torch.int32)
        tables = torch.zeros(self.n, b, args.capacity // bs, dtype=torch.int32)
        tables[:, :, :need] = owned
        self.tables = tables.cuda()
        self.lens = torch.full((b,), length, dtype=torch.int64, device="cuda")
        self.block_size = bs

    def call(self, i: int) -> tuple:
        """attention_decode's arguments after q for batch i."""
        return self.k, self.v, self.tables[i], self.lens, self.block_size


def _graph_us(call, calls: list[tuple]) -> float:
    """us per call: one graph holding call(*args) for every args of `calls`, replayed."""
    call(*calls[0])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in calls:
            call(*args)
    return _time_us(graph.replay) / len(calls)


def bench_length(args, q: torch.Tensor, length: int, copy: float, sms: int) -> None:
    """One output line (and the sweep's) for one sequence length."""
    n_kv, d = int(args.heads.split(",")[1]), q.shape[2]
    pools = Pools(args, n_kv, d, length)
    calls = [pools.call(i) for i in range(pools.n)]
    scale = d**-0.5
    kv_bytes = args.batch * length * pools.row_bytes
    y = att.attention_decode(q, *calls[0], scale)
    err = (y - reference(q, *calls[0], scale)).abs().max().item()
    assert err < 1e-3, f"length {length}: max error {err}"

    def ours(k, v, tables, lens, bs, cfg=args.config):
        att.attention_decode(q, k, v, tables, lens, bs, scale, cfg)

    us = _graph_us(ours, calls)
    gbps = kv_bytes / us / 1e3
    line = f"{length:>7} {us:8.2f} {gbps:7.0f} {100 * gbps / copy:6.1f}%"
    if args.sdpa and not CACHE_TYPES[args.dtype].quantized:
        qs = q.to(pools.k.dtype).unsqueeze(2)  # [B, H, 1, D]
        bs = pools.block_size
        offs = torch.arange(bs, device="cuda")

        def gathered(tables):  # the rows' K and V, [B, Hkv, length, D] each, contiguous
            rows = (tables[:, : -(-length // bs), None].long() * bs + offs).flatten(1)
            rows = rows[:, :length]
            return tuple(p[rows].transpose(1, 2).contiguous() for p in (pools.k, pools.v))

        def sdpa(k, v):
            torch.nn.functional.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)

        try:
            s_us = _graph_us(sdpa, [gathered(pools.tables[i]) for i in range(pools.n)])
            line += f" {s_us:8.2f} {kv_bytes / s_us / 1e3:9.0f}"
        except (RuntimeError, TypeError) as e:  # enable_gqa needs torch >= 2.5
            line += f"  sdpa failed: {str(e).splitlines()[0][:60]}"
    print(line, flush=True)
    if args.sweep:
        times = {}
        for b, s, per_sm, w, st in SWEEP:
            cfg = att.AttentionConfig(
                b, s, per_sm * sms, w, st, args.config.ahead, args.config.fit_wave
            )
            times[(b, s, per_sm, w, st)] = _graph_us(lambda *a, cfg=cfg: ours(*a, cfg), calls)
        best = min(times, key=times.get)
        row = "  ".join("/".join(map(str, c)) + f":{t:.1f}" for c, t in times.items())
        print(f"  sweep (block_s/min_slice/programs per SM/warps/stages:us) {row}")
        print(f"  best {best}: {times[best]:.2f} us, {kv_bytes / times[best] / 1e3:.0f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="32,8,128", help="H,Hkv,D (qwen3-8b, llama3-8b)")
    ap.add_argument("--capacity", type=int, default=40960, help="rows C of a block-table row")
    ap.add_argument("-B", "--batch", type=int, default=1, help="rows (sequences) per call")
    ap.add_argument("--block-size", type=int, default=64, help="rows per KV-cache block")
    ap.add_argument("--shuffle", action="store_true", help="blocks in a random pool order")
    ap.add_argument("--dtype", default="bf16", choices=tuple(CACHE_TYPES))
    ap.add_argument("--lengths", default=LENGTHS)
    ap.add_argument(
        "--no-ahead", action="store_true",
        help="block-type pools: loads not issued a step ahead (AttentionConfig.ahead off)",
    )  # fmt: skip
    ap.add_argument(
        "--fit-wave", action="store_true",
        help="registers capped so that every program of a long length fits at once "
        "(AttentionConfig.fit_wave)",
    )  # fmt: skip
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sdpa", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks/attention.py needs a CUDA device"
    assert args.capacity % args.block_size == 0, "--capacity must be a multiple of --block-size"
    torch.manual_seed(0)
    n_head, n_kv, d = (int(v) for v in args.heads.split(","))
    copy = copy_gbps()
    dev = torch.device("cuda")
    default = args.config = dataclasses.replace(
        att.default_config(dev, CACHE_TYPES[args.dtype].quantized),
        ahead=not args.no_ahead,
        fit_wave=args.fit_wave,
    )
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s")
    print(
        f"B={args.batch} H={n_head} Hkv={n_kv} D={d} C={args.capacity} {args.dtype} "
        f"block_size={args.block_size}{' shuffled' if args.shuffle else ''}; default {default}, "
        f"P={att.n_slices(args.capacity, n_kv, default)}"
    )
    q = torch.randn(args.batch, n_head, d, device="cuda")
    head = f"{'length':>7} {'us':>8} {'GB/s':>7} {'% copy':>7}"
    print(head + ("  sdpa us  sdpa GB/s" if args.sdpa else ""))
    for length in (int(v) for v in args.lengths.split(",")):
        if length <= args.capacity:
            bench_length(args, q, length, copy, sms)


if __name__ == "__main__":
    main()

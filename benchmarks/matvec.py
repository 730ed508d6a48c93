"""Micro-benchmark of kiln.kernels.matvec: GB/s of weight + activation traffic and % of a
device-to-device copy (the achievable HBM bandwidth). Not run by CI; needs a CUDA device.

    python benchmarks/matvec.py [--formats Q4_K,Q8_0] [--shapes 4096x4096,12288x4096] [--sweep]
                                [--compare]

A shape NxK is a weight of N output rows and K inputs (12288x4096 is an up projection).
--sweep also times a few launch configs per format on the first shape and uses the best one.
--compare also times the byte kernel (kiln.kernels.matvec.USE_WIDE off) at its default config
for the formats that have an M = 1 integer-view kernel.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.kernels import matvec as mv
from kiln.ops.reference import linear
from kiln.weight import Weight

FORMATS = "F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K"
SHAPES = "4096x4096,12288x4096,4096x12288"
SWEEP = [
    mv.MatvecConfig(block_n, tile, warps)
    for block_n, tile, warps in (
        (2, 256, 4),
        (4, 256, 4),
        (8, 256, 4),
        (16, 256, 4),
        (4, 512, 4),
        (8, 512, 8),
        (16, 512, 8),
        (8, 1024, 4),
        (16, 1024, 8),
        (32, 256, 4),
        (32, 512, 8),
    )
]


def _time_ms(fn) -> float:
    # do_bench clears the L2 cache between runs: a 4096x4096 Q4 weight (9 MB) would fit in it.
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks/matvec.py needs a CUDA device"
    torch.manual_seed(0)
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"{'format':6} {'N x K':>12} {'config':>14} {'us':>8} {'GB/s':>7} {'% copy':>7}")
    for fmt in args.formats.split(","):
        qtype = GGMLQuantizationType[fmt]
        cfg = None
        for i, (n, k) in enumerate(shapes):
            raw = quant.quantize(torch.randn(n, k, device="cuda"), qtype)
            w = Weight(fmt, qtype, (n, k), raw)
            x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
            err = (mv.matvec(x, w) - linear(x.float(), w)).abs().max().item()
            assert err < 1e-2, f"{fmt} {n}x{k}: max error {err}"
            if i == 0 and args.sweep:
                times = {c: _time_ms(lambda c=c, x=x, w=w: mv.matvec(x, w, c)) for c in SWEEP}
                cfg = min(times, key=times.get)
                sweep = ", ".join(
                    f"{c.block_n}/{c.tile_values}/{c.num_warps}:{t * 1e3:.1f}"
                    for c, t in times.items()
                )
                print(f"  sweep {fmt} (block_n/tile/warps: us): {sweep}")
            use = cfg or mv.default_config(qtype, n, k, args.m)
            ms = _time_ms(lambda w=w, x=x, use=use: mv.matvec(x, w, use))
            nbytes = raw.numel() + x.numel() * x.element_size() + args.m * n * 4
            gbps = nbytes / ms / 1e6
            tag = f"{use.block_n}/{use.tile_values}/{use.num_warps}"
            print(
                f"{fmt:6} {n:>5}x{k:<6} {tag:>14} {ms * 1e3:8.1f} {gbps:7.0f} "
                f"{100 * gbps / copy:6.1f}%"
            )
            if args.compare and qtype in mv._WIDE:
                mv.USE_WIDE = False
                base = mv.default_config(qtype, n, k, args.m)
                ms_b = _time_ms(lambda w=w, x=x, base=base: mv.matvec(x, w, base))
                mv.USE_WIDE = True
                gbps_b = nbytes / ms_b / 1e6
                tag = f"{base.block_n}/{base.tile_values}/{base.num_warps}"
                print(
                    f"{'  byte':6} {n:>5}x{k:<6} {tag:>14} {ms_b * 1e3:8.1f} {gbps_b:7.0f} "
                    f"{100 * gbps_b / copy:6.1f}%  (speedup {ms_b / ms:.2f}x)"
                )
            del w, raw


if __name__ == "__main__":
    main()

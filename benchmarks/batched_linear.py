"""Micro-benchmark of the linears of batched decode and small batches (M = 1..64 rows): every kernel
that can run a weight of M rows, us per call and the share of the HBM floor (the weight's bytes
at the device-to-device copy bandwidth), so that kiln.kernels.linear's choices by M
(BATCH_METHOD, Q8_BATCH_METHOD, matvec.MAX_M) are data. Not run by CI; needs a CUDA device.

    python benchmarks/batched_linear.py [--shapes Q4_K:24576x4096,Q8_0:6144x1024] [--m 1,2,8,16]

Methods (each where it reads the format and the row count):
- matvec: the float mat-vec (kernels/matvec.py), M <= matvec.MAX_M, x in fp32;
- matvec_q8: the dp4a mat-vec over q8_1 x (kernels/matvec_q8.py), M <= matvec.MAX_M;
- matmul_q8: the int8 tensor-core GEMM over q8_1 x (kernels/matmul_q8.py), its default config;
- exact: the GEMM with fp32 tiles (tf32x3), kernels/matmul.py EXACT_CONFIG, split-K auto;
- gemm: the bf16 GEMM at its default (or tuned) config, split-K auto; gemm/1: without split-K;
- dequant: the weight dequantized to bf16, then cuBLAS (kernels/matmul.py dequant_matmul);
- quants: the GEMM in the quant domain (MatmulConfig.quants, block formats): QUANTS_CONFIG's
  tile with the row tile fitted to M, split-K auto (the group sums of x included);
- exact/quants: the same with exact=True (x as three bf16 parts: the exact GEMM's contract).
--sweep instead times launch configs of the two exact kernels of batched decode (the float
mat-vec's byte kernel is not swept): matvec_q8 over SWEEP_MATVEC and the exact GEMM over
SWEEP_EXACT, at each M, and prints the fastest with the default's time.
Each time is a CUDA-graph replay over copies of the weight that overflow L2
(scripts/tune_matvec.time_us). The q8_1 quantization of x is not timed (norm_quant writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402

from benchmarks.matvec import copy_gbps  # noqa: E402
from kiln import quant  # noqa: E402
from kiln.kernels import matmul as mm  # noqa: E402
from kiln.kernels import matmul_q8, matvec, matvec_q8  # noqa: E402
from kiln.quant import q8_1  # noqa: E402
from kiln.weight import Weight  # noqa: E402
from scripts.tune_matvec import TOTAL_BYTES, time_us  # noqa: E402

# qwen3-8b Q4_K_M's linears (merged QKV, attn_output, merged gate/up, a Q6_K ffn_down) and
# qwen3-0.6b Q8_0's.
SHAPES = (
    "Q4_K:6144x4096,Q4_K:4096x4096,Q4_K:24576x4096,Q6_K:4096x12288,"
    "Q8_0:4096x1024,Q8_0:1024x2048,Q8_0:6144x1024,Q8_0:1024x3072"
)
METHODS = (
    "matvec", "matvec_q8", "matmul_q8", "exact", "gemm", "gemm/1", "dequant", "quants",
    "exact/quants",
)  # fmt: skip
# The quant domain's tile here: 64 weight rows, a super-block a step, 4 warps, 3 stages (its
# sm_90 compile: Q4_K 6.6 instructions a weight value and thread against 11.1 for the value
# domain's 16 x 64 x 64; exact 8.2 against EXACT_CONFIG's 18.3; tests/kernels/test_matmul.py
# compiles it for every format).
QUANTS_CONFIG = mm.MatmulConfig(16, 64, 256, 1, 4, 3, quants=True)


def launches(qtype, n: int, k: int, m: int) -> tuple[int, dict[str, list]]:
    """(the weight's bytes, {method: launches of x [m, K] over the weight and its copies,
    TOTAL_BYTES in all})."""
    w = Weight("w", qtype, (n, k), quant.quantize(torch.randn(n, k, device="cuda"), qtype))
    count = max(2, min(64, -(-TOTAL_BYTES // w.raw.numel())))
    weights = [w] + [Weight(w.name, w.qtype, w.shape, w.raw.clone()) for _ in range(count - 1)]
    x = torch.randn(m, k, device="cuda")
    xq = q8_1.quantize(x)
    cfg = mm.default_config(qtype, n, k, m, x.device)
    one = dataclasses.replace(cfg, splits=1)
    out: dict[str, list] = {}
    if m <= matvec.MAX_M:
        out["matvec"] = [lambda _, w=w: matvec.matvec(x, w) for w in weights]
        if matvec_q8.reads(w, 2):  # the kernel reads it (BF16_FASTER_UP_TO aside)
            out["matvec_q8"] = [lambda _, w=w: matvec_q8.matvec_q8(xq, w) for w in weights]
    if matmul_q8.reads(w):
        out["matmul_q8"] = [lambda _, w=w: matmul_q8.matmul_q8(xq, w) for w in weights]
    out["exact"] = [lambda _, w=w: mm.matmul(x, w, exact=True) for w in weights]
    out["gemm"] = [lambda _, w=w: mm.matmul(x, w, cfg) for w in weights]
    out["gemm/1"] = [lambda _, w=w: mm.matmul(x, w, one) for w in weights]
    out["dequant"] = [lambda _, w=w: mm.dequant_matmul(x, w) for w in weights]
    if quant.get_format(qtype.name).block_size > 1 and m > 1:
        rows = min(128, max(16, 1 << (m - 1).bit_length()))  # the row tile: M's power of two
        qd = dataclasses.replace(QUANTS_CONFIG, block_m=rows)
        out["quants"] = [lambda _, w=w: mm.matmul(x, w, qd) for w in weights]
        out["exact/quants"] = [lambda _, w=w: mm.matmul(x, w, qd, exact=True) for w in weights]
    return w.raw.numel(), out


SWEEP_MATVEC = [
    matvec.MatvecConfig(bn, tile, warps)
    for bn in (2, 4, 8, 16)
    for tile in (1024, 4096)
    for warps in (4, 8)
]
SWEEP_EXACT = [
    mm.MatmulConfig(16, bn, bk, 1, max(1, min(4, bn // 16)), stages)
    for bn in (32, 64, 128)
    for bk in (64, 128)
    for stages in (3, 4)
]


def sweep(qtype, n: int, k: int, m: int) -> str:
    """The fastest matvec_q8 and exact-GEMM configs at M rows, with their defaults' times."""
    w = Weight("w", qtype, (n, k), quant.quantize(torch.randn(n, k, device="cuda"), qtype))
    count = max(2, min(64, -(-TOTAL_BYTES // w.raw.numel())))
    weights = [w] + [Weight(w.name, w.qtype, w.shape, w.raw.clone()) for _ in range(count - 1)]
    x = torch.randn(m, k, device="cuda")
    xq = q8_1.quantize(x)
    cells = []
    kernels = [
        ("matvec_q8", SWEEP_MATVEC, matvec_q8.default_config(m),
         lambda c, w: matvec_q8.matvec_q8(xq, w, c)),
        ("exact", SWEEP_EXACT, mm.EXACT_CONFIG, lambda c, w: mm.matmul(x, w, c, exact=True)),
    ]  # fmt: skip
    for name, grid, default, run in kernels:
        if name == "matvec_q8" and not (m <= matvec.MAX_M and matvec_q8.reads(w, 2)):
            continue
        runs = [lambda c, w=w, run=run: run(c, w) for w in weights]
        times = {}
        for cfg in [default, *grid]:
            try:
                times[cfg] = time_us(runs, cfg)
            except Exception as e:  # out of resources: say which
                print(f"# {name} {cfg}: {type(e).__name__}", file=sys.stderr)
        best = min(times, key=times.get)
        cells.append(f"{name} default {times[default]:.1f} best {times[best]:.1f} {best}")
    return "; ".join(cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="FORMAT:NxK,...")
    ap.add_argument("--m", default="1,2,4,8,16,32,64", help="rows of x")
    ap.add_argument("--methods", default=",".join(METHODS), help="of " + ",".join(METHODS))
    ap.add_argument("--sweep", action="store_true", help="sweep the batched-decode configs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("batched_linear.py needs a CUDA GPU", file=sys.stderr)
        return 1
    methods = args.methods.split(",")
    gbps = copy_gbps()
    print(f"{torch.cuda.get_device_name()}, copy {gbps:.0f} GB/s; us per call (% of the floor)")
    print("| weight | M | " + " | ".join(methods) + " |")
    print("|---|---:|" + "---:|" * len(methods))
    for spec in args.shapes.split(","):
        fmt, shape = spec.split(":")
        qtype = GGMLQuantizationType[fmt]
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            if args.sweep:
                print(f"| {fmt} {shape} | {m} | {sweep(qtype, n, k, m)} |", flush=True)
                continue
            nbytes, runs = launches(qtype, n, k, m)
            floor_us = nbytes / gbps / 1e3
            cells = []
            for name in methods:
                if name not in runs:
                    cells.append("-")
                    continue
                try:
                    us = time_us(runs[name], None)
                    cells.append(f"{us:.1f} ({100 * floor_us / us:.0f}%)")
                except Exception as e:  # out of resources, an unsupported shape: say which
                    cells.append(type(e).__name__)
            print(f"| {fmt} {shape} | {m} | " + " | ".join(cells) + " |", flush=True)
            del runs
            mm.release_buffers()
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

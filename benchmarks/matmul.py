"""Micro-benchmark of the quantized GEMM (kiln.kernels.matmul): TFLOP/s of the Triton kernel and
of dequant_matmul per format, beside torch's bf16 matmul of the same shape (cuBLAS: the
tensor-core ceiling), at M = 512 and 2048 on qwen3-8b's shapes. Not run by CI; needs a CUDA
device.

    python benchmarks/matmul.py [--formats Q4_K,Q8_0] [--shapes 4096x4096] [--m 512,2048]

A shape NxK is a weight of N output rows and K inputs: 6144x4096 the merged QKV, 4096x4096 the
attention output, 24576x4096 the merged gate/up, 4096x12288 the down projection, 151936x4096
the output projection. The GEMM runs the config kiln.kernels.matmul.default_config gives (tuned
where this GPU has a table); "linear" says which of the two kiln.kernels.linear would run.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from gguf.constants import GGMLQuantizationType

from kiln import quant
from kiln.kernels import matmul as mm
from kiln.ops.reference import linear
from kiln.weight import Weight

FORMATS = "Q4_K,Q6_K,Q8_0,Q4_0,Q5_K,Q4_1,Q5_0,Q5_1,BF16,F16,F32"
SHAPES = "6144x4096,4096x4096,24576x4096,4096x12288,151936x4096"


def _time_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--m", default="512,2048", help="rows of x (comma-separated)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "benchmarks/matmul.py needs a CUDA device"
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ms_rows = [int(v) for v in args.m.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"{torch.cuda.get_device_name()}: TFLOP/s (2 M N K / time)")
    print(f"{'format':6} {'N x K':>12} {'M':>5} {'config':>22} {'gemm':>7} {'dequant':>7} "
          f"{'torch':>7} {'% torch':>7} linear")  # fmt: skip
    torch_tflops = {}
    for fmt in args.formats.split(","):
        qtype = GGMLQuantizationType[fmt]
        for n, k in shapes:
            w = Weight(fmt, qtype, (n, k), quant.quantize(torch.randn(n, k, device=dev), qtype))
            for m in ms_rows:
                x = torch.randn(m, k, device=dev)
                err = (mm.matmul(x[:64], w) - linear(x[:64], w)).abs().max().item()
                # |x|, |w| ~ 1: tolerances.MATMUL's bound, 8 * 2^-8 * sqrt(K)
                assert err < 8 * 2**-8 * k**0.5, f"{fmt} {n}x{k}: max error {err}"
                flop = 2 * m * n * k
                if (n, k, m) not in torch_tflops:
                    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
                    torch_tflops[(n, k, m)] = flop / _time_ms(lambda a=a, b=b: a @ b.T) / 1e9
                    del a, b
                cfg = mm.default_config(qtype, n, k, m, dev)
                gemm = flop / _time_ms(lambda x=x, w=w, cfg=cfg: mm.matmul(x, w, cfg)) / 1e9
                deq = flop / _time_ms(lambda x=x, w=w: mm.dequant_matmul(x, w)) / 1e9
                ref = torch_tflops[(n, k, m)]
                tag = f"{cfg.block_m}/{cfg.block_n}/{cfg.block_k}/{cfg.num_warps}/{cfg.num_stages}"
                tag += "" if cfg.swap_ab else "/xW"
                print(
                    f"{fmt:6} {n:>6}x{k:<5} {m:>5} {tag:>22} {gemm:7.1f} {deq:7.1f} {ref:7.1f} "
                    f"{100 * max(gemm, deq) / ref:6.1f}% {mm.method(qtype, n, k, m, dev)}",
                    flush=True,
                )
                del x
            del w
            mm.release_buffers()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Micro-benchmark of kiln.kernels.rope.qkv_norm_rope (the decode step's Q/K RMSNorm + RoPE + K/V
cache write): us per launch by KV-cache type, a block type with its rows rotated (the default,
kiln/quant/kv.py) and not (LLAMA_ATTN_ROT_DISABLE=1). Not run by CI; needs a CUDA device.

    python benchmarks/qkv_norm_rope.py [--heads 32,8,128] [-T 1] [--types f16,q8_0,q4_0]

Each time is of --launches launches (default 36, a qwen3-8b decode step's layers) replayed from
one CUDA graph, timed as benchmarks/attention.py times its calls (median of 20 replays),
divided by the launches: the launch-bound latency a decode step pays per layer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from benchmarks.attention import _graph_us  # noqa: E402
from kiln.kernels.rope import qkv_norm_rope  # noqa: E402
from kiln.quant.kv import CACHE_TYPES, ROT  # noqa: E402


def bench(args, type_name: str, rotated: bool) -> float:
    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if rotated else "1"  # read at allocation
    n_head, n_kv, d = (int(v) for v in args.heads.split(","))
    dev = torch.device("cuda")
    q = torch.randn(args.T, n_head, d, device=dev)
    k = torch.randn(args.T, n_kv, d, device=dev)
    v = torch.randn(args.T, n_kv, d, device=dev)
    qw, kw = None, None  # (the norm's weights change nothing in the time)
    positions = torch.arange(77, 77 + args.T, device=dev)
    slots = torch.arange(5, 5 + args.T, device=dev)
    freqs = (1e6 ** (-torch.arange(0, d, 2, device=dev).float() / d)).contiguous()
    kind = CACHE_TYPES[type_name]
    k_cache, v_cache = (kind.allocate(4096, n_kv, d, dev) for _ in range(2))

    def launch():
        qkv_norm_rope(q, k, v, qw, kw, 1e-6, positions, slots, freqs, True, k_cache, v_cache)

    return _graph_us(launch, [()] * args.launches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="32,8,128", help="H,Hkv,D (qwen3-8b)")
    ap.add_argument("-T", type=int, default=1, help="tokens per launch (default 1: decode)")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="KV-cache types")
    ap.add_argument("--launches", type=int, default=36, help="launches per graph (default 36)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/qkv_norm_rope.py needs a CUDA device")
    d = int(args.heads.split(",")[2])
    print(f"{torch.cuda.get_device_name()}: heads {args.heads}, T = {args.T}, us per launch")
    for name in args.types.split(","):
        kind = CACHE_TYPES[name]
        if kind.quantized and d % ROT == 0:
            print(f"{name:>6} rotated {bench(args, name, True):7.2f}")
            print(f"{name:>6} plain   {bench(args, name, False):7.2f}")
        else:
            print(f"{name:>6}         {bench(args, name, False):7.2f}")


if __name__ == "__main__":
    main()

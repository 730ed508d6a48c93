"""Where a decode step's time goes on the GPU: kernel time by kernel name, and the step's time
when replayed as a CUDA graph.

    python scripts/profile_decode.py --model synthetic:qwen3-8b:q4_k_m:4 [--fusion NAME=0]

One eager decode step is profiled (torch.profiler, after a warm-up) and its CUDA kernels are
grouped by name: launches, summed device time, share of the step. The same step captured as a
graph (kiln.runtime.cuda_graph.DecodeGraph) is then timed with CUDA events over many replays;
"graph us - kernel us" is what the gaps between kernels cost. A synthetic model with few layers
(the 4th field) shows the per-layer cost quickly; multiply by the real layer count. Needs a CUDA
GPU; not run by CI.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kiln.bench.models import load_gguf  # noqa: E402
from kiln.fusion import parse_overrides  # noqa: E402
from kiln.models import build_model  # noqa: E402
from kiln.runtime.cuda_graph import DecodeGraph  # noqa: E402
from kiln.runtime.kv_cache import KVCache  # noqa: E402


def kernel_times(model, cache) -> list[tuple[str, float]]:
    """[(kernel name, device us)] of one eager decode step's launches, in launch order."""
    token = torch.tensor([1], device="cuda")
    position = torch.tensor([cache.capacity - 1], device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            model.decode_step(token, position, cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.decode_step(token, position, cache)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    return [(e.name[:60], e.device_time) for e in kernels]


def graph_us(model, cache, replays: int = 200) -> float:
    """Mean device time of one decode step as the engine replays it (token and position written,
    graph replayed: DecodeGraph.__call__), in us."""
    with torch.inference_mode():
        graph = DecodeGraph(model, cache)
        for _ in range(10):
            graph(1, 5)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for i in range(replays):
            graph(1, 5 + i)
        end.record()
        torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / replays


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--fusion", action="append", default=[])
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument(
        "--trace", type=int, default=0, metavar="N",
        help="also list the first N launches in order (one layer's shapes, kernel by kernel)",
    )  # fmt: skip
    args = ap.parse_args()
    fusions = parse_overrides(args.fusion)
    for spec in args.model:
        gguf, name = load_gguf(spec, torch.device("cuda"))
        model = build_model(gguf, "cuda", backend="triton", fusions=fusions)
        cache = KVCache(
            model.config, args.n_ctx, model.device, dtype=torch.float16, initial=args.n_ctx
        )
        launched = kernel_times(model, cache)
        times: dict[str, list[float]] = defaultdict(list)
        for kernel, us in launched:
            times[kernel].append(us)
        total = sum(us for _, us in launched)
        launches = len(launched)
        step = graph_us(model, cache)
        print(
            f"\n{name}: {launches} kernels, {total:.0f} us of kernel time, graph replay "
            f"{step:.0f} us/step ({1e6 / step:.0f} steps/s), gaps {step - total:.0f} us"
        )
        print("| kernel | launches | us/step | us/launch | % |\n|---|---:|---:|---:|---:|")
        for k, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            t = sum(v)
            print(f"| {k} | {len(v)} | {t:.1f} | {t / len(v):.2f} | {100 * t / total:.1f} |")
        if args.trace:
            print("\n| # | kernel | us |\n|---:|---|---:|")
            for i, (kernel, us) in enumerate(launched[: args.trace]):
                print(f"| {i} | {kernel} | {us:.2f} |")
        del model, gguf, cache
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

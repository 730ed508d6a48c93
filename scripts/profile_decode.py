"""Where a decode step's time goes on the GPU: kernel time by kernel name, and the step's time
when replayed as a CUDA graph.

    python scripts/profile_decode.py --model synthetic:qwen3-8b:q4_k_m:4 [--batch 4] [--fusion X=0]
                                     [-ctk q8_0 -ctv q8_0]

An Engine of B sequences (--batch, default 1) is filled to n_ctx - 1 tokens each, so the step
decodes position n_ctx - 1 of every sequence. One eager decode step (Engine.step, after a
warm-up) is profiled with torch.profiler and its CUDA kernels are grouped by name: launches,
summed device time, share of the step (the host-to-device copies of the step's ForwardBatch are
left out: a graph replay makes them outside the graph). The same step as the engine replays it
(engine.graphs, the GraphRunner: the batch's tokens, positions and block tables written, the
graph of B's bucket replayed) is then timed with CUDA events over many replays; "graph us -
kernel us" is what the gaps between kernels cost. A synthetic model with few layers (the 4th
field) shows the per-layer cost quickly; multiply by the real layer count. Needs a CUDA GPU;
not run by CI.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kiln.bench.memory import synchronize  # noqa: E402
from kiln.bench.models import load_gguf  # noqa: E402
from kiln.fusion import parse_overrides  # noqa: E402
from kiln.models import build_model  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402

FILL_UBATCH = 8  # prompt forwards of <= 8 rows run the mat-vec kernels, not the reference


def filled_engine(
    model, n_ctx: int, batch: int, cache_type_k: str | None = None, cache_type_v: str | None = None
) -> tuple[Engine, list]:
    """An Engine of `batch` sequences holding n_ctx - 1 random tokens each (KV cache types as
    -ctk / -ctv; None: the backend's)."""
    engine = Engine(
        model, n_ctx=n_ctx, ubatch=FILL_UBATCH, n_seq=batch, cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
    )  # fmt: skip
    rng = random.Random(0)
    seqs = [engine.new_sequence() for _ in range(batch)]
    for seq in seqs:
        engine.reserve(seq, n_ctx)
        if n_ctx > 1:
            engine.prefill([rng.randrange(model.config.n_vocab) for _ in range(n_ctx - 1)], seq)
    return engine, seqs


def launched(run, device: torch.device) -> list[tuple[str, float]]:
    """[(kernel name, device us)] of the CUDA kernels run() launches, in launch order (the
    host-to-device copies of its inputs left out; [] on a CPU, where nothing is launched)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy HtoD")
    ]
    kernels.sort(key=lambda e: e.time_range.start)
    return [(e.name[:60], e.device_time) for e in kernels]


def kernel_times(engine: Engine, seqs: list) -> list[tuple[str, float]]:
    """[(kernel name, device us)] of one eager decode step's launches, in launch order."""
    depth = seqs[0].length

    def step() -> None:
        for seq in seqs:
            seq.truncate(depth)  # the same step each time
        engine.step([(seq, [1]) for seq in seqs])
        synchronize(engine.device)

    for _ in range(2):
        step()
    kernels = launched(step, engine.device)
    for seq in seqs:
        seq.truncate(depth)
    return kernels


def graph_us(engine: Engine, seqs: list, replays: int = 200) -> float | None:
    """Mean device time of one decode step as the engine replays it (engine.graphs: the step's
    inputs written, the bucket's graph replayed; the lengths are not advanced, so every replay
    is the same step), in us; None when the step has no graph (cuda_graphs off, or more
    sequences than the largest bucket)."""
    graphs = engine.graphs
    if graphs is None or len(seqs) > graphs.max_batch:
        return None
    tokens = [1] * len(seqs)
    for seq in seqs:
        engine.reserve(seq, 1)  # the step's slot (a block the cut back may have given back)
    with torch.inference_mode():
        for _ in range(10):  # the first captures the bucket's graph
            graphs(tokens, seqs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(replays):
            graphs(tokens, seqs)
        end.record()
        torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / replays


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--fusion", action="append", default=[])
    ap.add_argument("--n-ctx", type=int, default=512, help="context of each sequence (default 512)")
    ap.add_argument(
        "--batch", type=int, default=1, metavar="B",
        help="sequences decoded together in the step (default 1)",
    )  # fmt: skip
    for flag, long in (("-ctk", "--cache-type-k"), ("-ctv", "--cache-type-v")):
        ap.add_argument(
            flag, long, default=None, metavar="TYPE",
            help=f"the KV cache's {long[-1].upper()} type: f16, bf16, q8_0, q4_0 (default: the "
            "backend's)",
        )  # fmt: skip
    ap.add_argument(
        "--trace", type=int, default=0, metavar="N",
        help="also list the first N launches in order (one layer's shapes, kernel by kernel)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.n_ctx < 1:
        ap.error(f"--n-ctx must be >= 1, got {args.n_ctx}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    fusions = parse_overrides(args.fusion)
    for spec in args.model:
        gguf, name = load_gguf(spec, torch.device("cuda"))
        model = build_model(gguf, "cuda", backend="triton", fusions=fusions)
        engine, seqs = filled_engine(
            model, args.n_ctx, args.batch, args.cache_type_k, args.cache_type_v
        )
        launched = kernel_times(engine, seqs)
        times: dict[str, list[float]] = defaultdict(list)
        for kernel, us in launched:
            times[kernel].append(us)
        total = sum(us for _, us in launched)
        launches = len(launched)
        step = graph_us(engine, seqs)
        head = f"\n{name}, B = {args.batch}: {launches} kernels, {total:.0f} us of kernel time"
        if step is None:
            print(f"{head}, no graph (cuda_graphs off, or B above the largest bucket)")
        else:
            print(
                f"{head}, graph replay {step:.0f} us/step ({1e6 / step:.0f} steps/s, "
                f"{args.batch * 1e6 / step:.0f} tokens/s), gaps {step - total:.0f} us"
            )
        print("| kernel | launches | us/step | us/launch | % |\n|---|---:|---:|---:|---:|")
        for k, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            t = sum(v)
            print(f"| {k} | {len(v)} | {t:.1f} | {t / len(v):.2f} | {100 * t / total:.1f} |")
        if args.trace:
            print("\n| # | kernel | us |\n|---:|---|---:|")
            for i, (kernel, us) in enumerate(launched[: args.trace]):
                print(f"| {i} | {kernel} | {us:.2f} |")
        del model, gguf, engine, seqs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

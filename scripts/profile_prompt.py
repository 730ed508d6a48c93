"""Where a prompt forward's time goes on the GPU: its wall time against the time its kernels
take, so a forward bound by the host's launches shows (the GPU idle between them).

    python scripts/profile_prompt.py --model synthetic:qwen3-0.6b:q8_0 [-p 512] [--depth 0]
                                     [--fusion prompt_graphs=1]

One Engine.step of P tokens of one sequence (the prompt's micro-batch: P is also the engine's
ubatch, so the prompt_graphs fusion replays it when on), at depth D (D tokens already in the
cache, not timed), the last token's logits, as `kiln bench -p P` runs it: the wall time of the
step (launch to synchronize) over repeats, min and median; then one step under torch.profiler:
its CUDA kernels (the host-to-device copies of the step's inputs left out), their summed device
time, and that sum over the median wall time (how busy the GPU was). Session 17, H100:
qwen3-0.6b Q8_0's pp512 took 31.2 ms of wall time for 3.4 ms of kernels. Needs a CUDA GPU; not
run by CI.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from kiln.bench.memory import synchronize  # noqa: E402
from kiln.bench.models import load_gguf  # noqa: E402
from kiln.fusion import parse_overrides  # noqa: E402
from kiln.models import build_model  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402
from scripts.profile_decode import launched  # noqa: E402


def prompt_step(model, tokens: int, depth: int):
    """An Engine whose one sequence holds `depth` tokens, and a function running the same
    step of `tokens` more (cut back to the depth first) -> (the step, the sequence)."""
    engine = Engine(model, n_ctx=depth + tokens + 1, ubatch=tokens)
    rng = random.Random(0)
    seq = engine.new_sequence()
    if depth:
        engine.prefill([rng.randrange(model.config.n_vocab) for _ in range(depth)], seq)
    ids = [rng.randrange(model.config.n_vocab) for _ in range(tokens)]

    def step() -> None:
        seq.truncate(depth)
        engine.step([(seq, ids)], "last")
        synchronize(engine.device)

    return step, seq


def wall_ms(step, repeats: int) -> list[float]:
    """The step's wall times in ms (after two untimed runs: compiles, captures)."""
    for _ in range(2):
        step()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--fusion", action="append", default=[])
    ap.add_argument("-p", "--prompt", type=int, default=512, help="tokens of the step (512)")
    ap.add_argument("--depth", type=int, default=0, help="tokens already in the cache (0)")
    ap.add_argument("-r", "--repeats", type=int, default=10, help="timed steps (10)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed (12)")
    args = ap.parse_args(argv)
    if args.prompt < 2:
        ap.error(f"-p must be >= 2 (one token is a decode step), got {args.prompt}")
    if args.depth < 0 or args.repeats < 1:
        ap.error("--depth must be >= 0 and -r >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_prompt: needs a CUDA GPU", file=sys.stderr)
        return 1
    fusions = parse_overrides(args.fusion)
    device = torch.device("cuda")
    for spec in args.model:
        gguf, name = load_gguf(spec, device)
        model = build_model(gguf, device, backend="triton", fusions=fusions)
        step, _ = prompt_step(model, args.prompt, args.depth)
        walls = wall_ms(step, args.repeats)
        kernels = launched(step, device)
        median = statistics.median(walls)
        busy = sum(us for _, us in kernels) / 1e3
        print(
            f"\n{name}, {args.prompt} tokens at depth {args.depth} ({model.policy.describe()}): "
            f"wall min {min(walls):.2f} / median {median:.2f} ms ({args.prompt / median * 1e3:.0f}"
            f" t/s); {len(kernels)} kernels, {busy:.2f} ms of kernel time: the GPU busy "
            f"{100 * busy / median:.0f}% of the step"
        )
        times: dict[str, list[float]] = defaultdict(list)
        for kernel, us in kernels:
            times[kernel].append(us)
        print("| kernel | launches | us | % of kernel time |\n|---|---:|---:|---:|")
        ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))
        for kernel, v in ranked[: args.top]:
            print(f"| {kernel} | {len(v)} | {sum(v):.1f} | {100 * sum(v) / 1e3 / busy:.1f} |")
        del model, gguf, step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

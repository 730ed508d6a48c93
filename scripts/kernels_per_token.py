"""GPU kernels launched per decode step, with every fusion on and with each one off.

    python scripts/kernels_per_token.py --model synthetic:qwen3-0.6b:q8_0 [--batch 4]

Counts the CUDA kernels of one eager decode step of B sequences (Engine.step, one token each;
torch.profiler) after a warm-up; with the cuda_graphs fusion the engine launches the whole count
as one graph (Engine.decode_batch: kiln.runtime.graphs), so this is the number of kernels in the
graph of that batch size. The host-to-device copies of the step's ForwardBatch are not counted
(a graph replay makes them outside the graph). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kiln.bench.memory import synchronize  # noqa: E402
from kiln.bench.models import load_gguf  # noqa: E402
from kiln.fusion import FUSIONS  # noqa: E402
from kiln.models import build_model  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402

PROMPT = [1, 2, 3]  # each sequence decodes at position 3, as the count always has


def kernels_per_step(gguf, fusions: dict[str, bool], batch: int = 1) -> int:
    """Kernels of one eager decode step of `batch` sequences, the model built on the GPU."""
    model = build_model(gguf, "cuda", backend="triton", fusions=fusions)
    return count_kernels(model, batch)


def count_kernels(model, batch: int = 1) -> int:
    """CUDA kernels of one eager decode step of `batch` sequences of `model` (on any device:
    the step runs there; a CPU model launches none)."""
    engine = Engine(model, n_ctx=64, n_seq=batch)
    seqs = [engine.new_sequence() for _ in range(batch)]
    for seq in seqs:
        engine.prefill(PROMPT, seq)

    def step() -> None:
        for seq in seqs:
            seq.truncate(len(PROMPT))  # the same step each time
        engine.step([(seq, [1]) for seq in seqs])
        synchronize(engine.device)

    step()  # compiles
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not is_upload(e.name)
    )


def is_upload(name: str) -> bool:
    """A host-to-device copy (the ForwardBatch's tensors), not part of a captured step."""
    return name.startswith("Memcpy HtoD")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b:q8_0")
    ap.add_argument(
        "--batch", type=int, default=1, metavar="B",
        help="sequences decoded together in the step (default 1)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_per_token: needs a CUDA GPU", file=sys.stderr)
        return 1
    gguf, name = load_gguf(args.model, torch.device("cuda"))
    b = args.batch
    switchable = [n for n in FUSIONS if n != "cuda_graphs"]
    print(f"| {name} | kernels per decode step (B = {b}) |\n|---|---:|")
    print(f"| all fusions on | {kernels_per_step(gguf, {}, b)} |")
    for n in switchable:
        print(f"| {n}=0 | {kernels_per_step(gguf, {n: False}, b)} |")
    print(f"| all off | {kernels_per_step(gguf, {n: False for n in switchable}, b)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

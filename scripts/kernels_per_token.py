"""GPU kernels launched per decoded token, with every fusion on and with each one off.

    python scripts/kernels_per_token.py --model synthetic:qwen3-0.6b:q8_0

Counts the CUDA kernels of one eager decode step (torch.profiler) after a warm-up; with the
cuda_graphs fusion the host then launches the whole count as one graph, so this is the number of
kernels in the graph. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kiln.bench.models import load_gguf  # noqa: E402
from kiln.fusion import FUSIONS  # noqa: E402
from kiln.models import build_model  # noqa: E402
from kiln.runtime.kv_cache import KVCache  # noqa: E402


def kernels_per_step(gguf, fusions: dict[str, bool]) -> int:
    model = build_model(gguf, "cuda", backend="triton", fusions=fusions)
    cache = KVCache(model.config, 64, model.device, dtype=torch.float16, initial=64)
    token = torch.tensor([1], device="cuda")
    position = torch.tensor([3], device="cuda")
    with torch.inference_mode():
        model.decode_step(token, position, cache)  # compiles
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.decode_step(token, position, cache)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic:qwen3-0.6b:q8_0")
    args = ap.parse_args()
    gguf, name = load_gguf(args.model, torch.device("cuda"))
    switchable = [n for n in FUSIONS if n != "cuda_graphs"]
    print(f"| {name} | kernels per decode step |\n|---|---:|")
    print(f"| all fusions on | {kernels_per_step(gguf, {})} |")
    for n in switchable:
        print(f"| {n}=0 | {kernels_per_step(gguf, {n: False})} |")
    print(f"| all off | {kernels_per_step(gguf, {n: False for n in switchable})} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

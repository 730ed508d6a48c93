"""Tune the decode mat-vec's launch configs for this GPU on the shapes the benchmark models use.

    python scripts/tune_matvec.py --out kiln/kernels/configs   # on a CUDA machine

For each (format, N, K) of SHAPES it times the default config and every config of GRID at M = 1
(replayed from a CUDA graph over copies of the weight that overflow L2, as a decode step runs
it; see time_us) and keeps the fastest where it beats the default by more than 3%. The
result replaces the tuned formats' entries in `matvec,device=<gpu name>.json` (named by
kiln.kernels.config_name; kiln.kernels.matvec.tuned_configs reads it):
{"Q4_K": {"4096x4096": {"block_n": 8, "tile_values": 1024, "num_warps": 4, "us": ...,
"default_us": ...}}}. Needs a CUDA GPU; not run by CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402

from kiln import quant  # noqa: E402
from kiln.kernels import config_name  # noqa: E402
from kiln.kernels import matvec as mv  # noqa: E402
from kiln.ops.weight import Weight  # noqa: E402

# (N, K) of the mat-vecs of qwen3-0.6b, qwen3-8b / llama3-8b (merged QKV and gate/up) and the
# experts of qwen3-30b-a3b, per format they come in.
SHAPES = {
    "Q8_0": ["4096x1024", "1024x2048", "6144x1024", "1024x3072", "6144x4096", "4096x4096",
             "24576x4096", "4096x12288"],
    "Q4_K": ["6144x4096", "4096x4096", "24576x4096", "4096x12288", "1536x2048", "4096x4096"],
    "Q6_K": ["4096x12288", "1024x4096", "2048x768", "151936x4096", "151936x2048"],
    "Q4_0": ["6144x4096", "4096x4096", "28672x4096", "4096x14336"],
    "Q4_1": ["960x576", "576x576", "3072x576", "576x1536"],
}  # fmt: skip
GRID = [(bn, tile, warps) for bn in (2, 4, 8, 16) for tile in (512, 1024, 2048)
        for warps in (4, 8)]  # fmt: skip


def time_us(x: torch.Tensor, weights: list[Weight], cfg: mv.MatvecConfig) -> float:
    """Device time of one mat-vec as a decode step runs it: one launch per copy of the weight
    (together larger than the L2 cache, so each reads HBM), captured in a CUDA graph and replayed
    (no host launch gaps); the median of 7 replays over the number of launches, in us."""
    for w in weights:  # compiles, and settles the allocator before the capture
        mv.matvec(x, w, cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            mv.matvec(x, w, cfg)
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[3] / len(weights)


def copies(w: Weight, total_bytes: int = 200 << 20) -> list[Weight]:
    """w and copies of it, at least total_bytes together (4x an H100's 50 MB L2), at most 64."""
    n = max(2, min(64, -(-total_bytes // w.raw.numel())))
    return [w] + [Weight(w.name, w.qtype, w.shape, w.raw.clone()) for _ in range(n - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(mv.CONFIG_DIR))
    ap.add_argument("--formats", default=",".join(SHAPES))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "tuning needs a CUDA GPU"
    name = torch.cuda.get_device_name()
    result: dict[str, dict[str, dict]] = {}
    path = Path(args.out) / config_name("matvec", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The formats tuned now replace their entries; the others' stay as they were measured.
    kept = json.loads(path.read_text()) if path.exists() else {}
    for fmt in args.formats.split(","):
        kept.pop(fmt, None)
    print(f"{name}\n| format | N x K | default us | best us | best config |")
    print("|---|---|---:|---:|---|")
    for fmt in args.formats.split(","):
        qtype = GGMLQuantizationType[fmt]
        for shape in dict.fromkeys(SHAPES[fmt]):
            n, k = (int(v) for v in shape.split("x"))
            w = Weight(fmt, qtype, (n, k), quant.quantize(torch.randn(n, k, device="cuda"), qtype))
            w = copies(w)
            x = torch.randn(1, k, device="cuda")
            default = mv.default_config(qtype, n, k, 1, tuned=False)
            base = time_us(x, w, default)
            times = {}
            for bn, tile, warps in GRID:
                cfg = mv.MatvecConfig(bn, tile, warps)
                try:
                    times[cfg] = time_us(x, w, cfg)
                except Exception as e:  # a config the compiler rejects (e.g. out of resources)
                    print(f"# {fmt} {shape} {cfg}: {type(e).__name__}", file=sys.stderr)
            best = min(times, key=times.get)
            print(f"| {fmt} | {shape} | {base:.1f} | {times[best]:.1f} | "
                  f"{best.block_n}/{best.tile_values}/{best.num_warps} |", flush=True)  # fmt: skip
            if times[best] < 0.97 * base:
                result.setdefault(fmt, {})[shape] = {
                    "block_n": best.block_n, "tile_values": best.tile_values,
                    "num_warps": best.num_warps, "us": round(times[best], 2),
                    "default_us": round(base, 2),
                }  # fmt: skip
            # Written after every shape: a run cut short keeps what it measured.
            path.write_text(json.dumps({**kept, **result}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tune the decode mat-vec's launch configs for this GPU on the shapes the benchmark models use.

    python scripts/tune_matvec.py --out kiln/kernels/configs   # on a CUDA machine

For each (format, N, K) of SHAPES it times the default config and every config of GRID at M = 1
(replayed from a CUDA graph over copies of the weight that overflow L2, as a decode step runs
it; see time_us) and keeps the fastest where it beats the default by more than 3%. A shape
"NxKxS" is the MoE launch (kiln/kernels/moe.py) of S experts of N x K chosen from 128 (a
different random choice per launch, like the layers of a step). Launches use programmatic
dependent launch where this GPU's fusion policy turns `pdl` on, as the decode step does. The
result replaces the tuned formats' entries in `matvec,device=<gpu name>.json` (named by
kiln.kernels.config_name; kiln.kernels.matvec.tuned_configs reads it):
{"Q4_K": {"4096x4096": {"block_n": 8, "tile_values": 1024, "num_warps": 4, "us": ...,
"default_us": ...}, "1536x2048x8": {...}}}. Needs a CUDA GPU; not run by CI.
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
from kiln.fileio import write_text  # noqa: E402
from kiln.fusion import FusionPolicy  # noqa: E402
from kiln.kernels import config_name, moe  # noqa: E402
from kiln.kernels import matvec as mv  # noqa: E402
from kiln.weight import Weight  # noqa: E402

# (N, K) of the mat-vecs of qwen3-0.6b, qwen3-8b / llama3-8b (merged QKV and gate/up) and the
# experts of qwen3-30b-a3b, per format they come in.
SHAPES = {
    "F32": ["128x2048"],  # qwen3-30b-a3b's router
    "Q8_0": ["4096x1024", "1024x2048", "6144x1024", "1024x3072", "6144x4096", "4096x4096",
             "24576x4096", "4096x12288", "151936x1024"],
    "Q4_K": ["6144x4096", "4096x4096", "24576x4096", "4096x12288", "1536x2048", "4096x4096",
             "5120x2048", "2048x4096", "1536x2048x8", "2048x768x8"],
    "Q6_K": ["4096x12288", "1024x4096", "2048x768", "151936x4096", "151936x2048", "2048x768x8"],
    "Q4_0": ["6144x4096", "4096x4096", "28672x4096", "4096x14336"],
    "Q4_1": ["960x576", "576x576", "3072x576", "576x1536"],
}  # fmt: skip
GRID = [(bn, tile, warps) for bn in (2, 4, 8, 16) for tile in (512, 1024, 2048)
        for warps in (4, 8)]  # fmt: skip


def time_us(launches: list, arg, replays: int = 7) -> float:
    """Device time of one launch as a step runs it: the launches, each called with `arg` (a
    config; each reads a different copy of the weight, or other experts; together larger than
    the L2 cache, so each reads HBM), captured in a CUDA graph and replayed (no host launch
    gaps); the median of `replays` replays over the number of launches, in us. Also used by
    scripts/tune_matmul.py."""
    for launch in launches:  # compiles, and settles the allocator before the capture
        launch(arg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch(arg)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[replays // 2] / len(launches)


TOTAL_BYTES = 200 << 20  # what the launches of one replay read: 4x an H100's 50 MB L2


def plain_launches(qtype, n: int, k: int, pdl: bool) -> list:
    """Mat-vecs of x [1, K] with a weight and its copies (at least TOTAL_BYTES, at most 64)."""
    w = Weight("w", qtype, (n, k), quant.quantize(torch.randn(n, k, device="cuda"), qtype))
    count = max(2, min(64, -(-TOTAL_BYTES // w.raw.numel())))
    weights = [w] + [Weight(w.name, w.qtype, w.shape, w.raw.clone()) for _ in range(count - 1)]
    x = torch.randn(1, k, device="cuda")
    return [lambda cfg, w=w: mv.matvec(x, w, cfg, pdl=pdl) for w in weights]


def expert_launches(qtype, n: int, k: int, slots: int, pdl: bool, n_expert: int = 128) -> list:
    """MoE launches of `slots` experts of [n_expert, N, K] (x [1, K]: the gate/up case), each
    with its own random choice of experts, at least TOTAL_BYTES of experts read in all."""
    one = quant.quantize(torch.randn(n, k, device="cuda"), qtype)  # [N, row_bytes]
    raw = one[None].repeat(n_expert, 1, 1)  # the same values in every expert: timing only
    w = Weight("experts", qtype, (n_expert, n, k), raw)
    count = max(2, min(64, -(-TOTAL_BYTES // (slots * one.numel()))))
    x = torch.randn(1, k, device="cuda")
    ids = [torch.randperm(n_expert, device="cuda")[:slots][None] for _ in range(count)]  # [1, k]
    return [lambda cfg, i=i: moe.expert_linear(x, i, w, cfg, pdl=pdl) for i in ids]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(mv.CONFIG_DIR))
    ap.add_argument("--formats", default=",".join(SHAPES))
    ap.add_argument(
        "--shapes", help="only these shapes of SHAPES (e.g. 1536x2048x8,2048x768x8); their "
        "entries are replaced and the format's other shapes kept",
    )  # fmt: skip
    args = ap.parse_args()
    assert torch.cuda.is_available(), "tuning needs a CUDA GPU"
    name = torch.cuda.get_device_name()
    # Launched as the decode step launches them: with programmatic dependent launch where this
    # GPU's fusion policy turns it on (the next launch's ramp overlaps this one's tail).
    pdl = FusionPolicy.resolve(torch.device("cuda"), "triton").pdl
    result: dict[str, dict[str, dict]] = {}
    path = Path(args.out) / config_name("matvec", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The formats tuned now replace their entries (with --shapes: those shapes' entries); the
    # others stay as they were measured.
    kept = json.loads(path.read_text()) if path.exists() else {}
    only = set(args.shapes.split(",")) if args.shapes else None
    for fmt in args.formats.split(","):
        if only is None:
            kept.pop(fmt, None)
        else:
            kept[fmt] = {s: c for s, c in kept.get(fmt, {}).items() if s not in only}
    print(f"{name} (pdl={int(pdl)})\n| format | N x K | default us | best us | best config |")
    print("|---|---|---:|---:|---|")
    for fmt in args.formats.split(","):
        qtype = GGMLQuantizationType[fmt]
        for shape in dict.fromkeys(SHAPES[fmt]):
            if only is not None and shape not in only:
                continue
            n, k, slots = mv.parse_shape(shape)
            if slots == 1:
                launches = plain_launches(qtype, n, k, pdl)
            else:
                launches = expert_launches(qtype, n, k, slots, pdl)
            default = mv.default_config(qtype, n, k, 1, tuned=False)
            base = time_us(launches, default)
            times = {}
            for bn, tile, warps in GRID:
                cfg = mv.MatvecConfig(bn, tile, warps)
                try:
                    times[cfg] = time_us(launches, cfg)
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
            merged = {f: {**kept.get(f, {}), **result.get(f, {})} for f in {*kept, *result}}
            write_text(path, json.dumps(merged, indent=1, sort_keys=True) + "\n", "the configs")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

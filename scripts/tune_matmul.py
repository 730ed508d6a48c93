"""Tune the quantized GEMM for this GPU: per (format, N, K, M bucket), the fastest Triton config
and whether dequant_matmul (the weight dequantized to a kept bf16 buffer, then cuBLAS) beats it.

    python scripts/tune_matmul.py                         # on a CUDA machine: every shape
    python scripts/tune_matmul.py --formats Q4_K --buckets 512,2048 --shapes 4096x4096

For each shape "NxK" of SHAPES (the weights of the benchmark models: qwen3-8b, llama3-8b and
qwen3-0.6b, merged QKV and gate/up, the output projection) and each M bucket of
kiln.kernels.matmul.M_BUCKETS (M = the bucket's top), it times the default config, every
candidate of `candidates` and dequant_matmul, each as the launches of a prompt run them (CUDA
graph replays over copies of the weight that overflow L2; see time_us), and records the winner:
"dequant" where dequant_matmul is more than 3% faster than the best Triton config, else
"triton". The entries replace the tuned ones in `matmul,device=<gpu name>.json` (named by
kiln.kernels.config_name, read by kiln.kernels.matmul.tuned_configs), with the times that decided
them: {"Q4_K": {"4096x4096": {"512": {"method": "triton", "block_m": 128, ..., "us": ...,
"triton_us": ..., "dequant_us": ..., "default_us": ...}}}}. Needs a CUDA GPU; not run by CI.
Every shape and bucket is 20 shapes x 10 buckets x up to 42 configs: restrict a run with
--formats, --shapes and --buckets (the table keeps what other runs measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from gguf.constants import GGMLQuantizationType  # noqa: E402

from kiln import quant  # noqa: E402
from kiln.fileio import write_text  # noqa: E402
from kiln.kernels import CONFIG_DIR, config_name  # noqa: E402
from kiln.kernels import matmul as mm  # noqa: E402
from kiln.weight import Weight  # noqa: E402
from scripts.tune_matvec import TOTAL_BYTES  # noqa: E402
from scripts.tune_matvec import time_us as _graph_time_us  # noqa: E402

_8B = ["6144x4096", "4096x4096", "24576x4096", "4096x12288", "151936x4096"]  # qwen3-8b
SHAPES = {
    "Q4_K": _8B,  # qwen3-8b Q4_K_M
    "Q6_K": ["4096x12288", "1024x4096", "151936x4096"],  # Q4_K_M's attn_v, ffn_down, output
    "Q8_0": _8B + ["4096x1024", "1024x2048", "6144x1024", "1024x3072", "151936x1024"],
    "Q4_0": ["6144x4096", "4096x4096", "28672x4096", "4096x14336", "128256x4096"],  # llama3-8b
}


def candidates(bucket: int, qtype: GGMLQuantizationType | None = None) -> list[mm.MatmulConfig]:
    """The Triton configs tried for an M bucket: the two largest row tiles that fit it (of 16..256),
    64..256 weight rows, both dot orders (x @ W^T from 64 rows, where wgmma takes it); 8 warps
    where the left operand has 128 rows (two warpgroups), else 4; GROUP_M 8, 3 stages (4 for tiles
    of 16 and 32 rows). Compiled for sm_90, accumulators of more than 128 registers a thread spill
    (256 x 256 tiles: 465-1248 spill stores in the loop), and BLOCK_K 128 spills from 128 on:
    BLOCK_K 128 only up to 64 accumulator registers. Up to 64 rows (decode-sized launches, where
    a step's work is too small to hide its weight loads) each also with the loads issued a step
    ahead (MatmulConfig.ahead). For a block format (qtype) up to 256 rows also the quant domain
    (MatmulConfig.quants: a step of 256 values, 64 or 128 weight rows, the two row tiles; Q4_K
    and Q5_K up to 64 rows also with ahead; at most 8 more). At most 42 a bucket."""
    top = min(256, max(16, bucket))
    out = []
    for bm in (top, top // 2) if top > 16 else (16,):
        stages = 4 if bm <= 32 else 3
        for bn in (64, 128, 256):
            for swap_ab in (True, False):
                left = bn if swap_ab else bm  # the rows of wgmma's left operand
                if not swap_ab and bm < 64:
                    continue
                warps = 8 if left >= 128 else 4
                acc = bm * bn // (32 * warps)  # fp32 accumulator registers a thread
                for bk in (64, 128) if swap_ab else (64,):
                    if acc <= 128 and (bk == 64 or acc <= 64):
                        out.append(mm.MatmulConfig(bm, bn, bk, 8, warps, stages, swap_ab))
    if bucket <= 64:
        out += [dataclasses.replace(c, ahead=True) for c in out]
    if qtype is not None and quant.get_format(qtype.name).block_size > 1 and bucket <= 256:
        for bm in dict.fromkeys((min(top, 128), max(16, min(top, 128) // 2))):
            for bn, warps in ((64, 4), (128, 8)):
                out.append(mm.MatmulConfig(bm, bn, 256, 8, warps, 3, quants=True))
                if qtype.name in ("Q4_K", "Q5_K") and bucket <= 64:
                    out.append(mm.MatmulConfig(bm, bn, 256, 8, warps, 3, quants=True, ahead=True))
    return out


def time_us(launches: list, arg) -> float:
    """Device time of one launch as a prompt runs it (the launches, each with a different copy
    of the weight, together larger than the L2 cache: tune_matvec.time_us), median of 5
    replays; the first calls also allocate dequant_matmul's buffer before the capture."""
    return _graph_time_us(launches, arg, replays=5)


def shape_launches(qtype, n: int, k: int, m: int) -> tuple[list, list]:
    """(GEMM launches taking a config, dequant_matmul launches) of x [m, K] with a weight and
    its copies (at least TOTAL_BYTES, 2..8 of them)."""
    w = Weight("w", qtype, (n, k), quant.quantize(torch.randn(n, k, device="cuda"), qtype))
    count = max(2, min(8, -(-TOTAL_BYTES // w.raw.numel())))
    weights = [w] + [Weight(w.name, w.qtype, w.shape, w.raw.clone()) for _ in range(count - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    gemm = [lambda cfg, w=w: mm.matmul(x, w, cfg) for w in weights]
    dequant = [lambda _, w=w: mm.dequant_matmul(x, w) for w in weights]
    return gemm, dequant


def entry(best: mm.MatmulConfig, triton_us: float, dequant_us: float, default_us: float) -> dict:
    """One (format, shape, bucket) entry of the table, as tuned_configs reads it."""
    method = "dequant" if dequant_us < 0.97 * triton_us else "triton"
    times = {"us": round(min(triton_us, dequant_us), 2), "triton_us": round(triton_us, 2)}
    times |= {"dequant_us": round(dequant_us, 2), "default_us": round(default_us, 2)}
    return {"method": method, **asdict(best), **times}


def merge(path: Path, result: dict) -> None:
    """Write result's entries over those of the table at path (the others stay as measured)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    for fmt, shapes in result.items():
        for shape, buckets in shapes.items():
            table.setdefault(fmt, {}).setdefault(shape, {}).update(buckets)
    write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n", "the configs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(CONFIG_DIR), help="folder of the table")
    ap.add_argument("--formats", default=",".join(SHAPES), help="of " + ",".join(SHAPES))
    ap.add_argument("--shapes", help="only these NxK shapes of the formats' SHAPES")
    ap.add_argument(
        "--buckets", default=",".join(map(str, mm.M_BUCKETS)), help="M buckets (default: all)"
    )
    args = ap.parse_args(argv)
    for fmt in args.formats.split(","):
        if fmt not in SHAPES:
            ap.error(f"--formats: {fmt} is not one of {','.join(SHAPES)}")
    bad = sorted(set(args.buckets.split(",")) - set(map(str, mm.M_BUCKETS)))
    if bad:
        ap.error(f"--buckets: {','.join(bad)} not in {','.join(map(str, mm.M_BUCKETS))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_matmul.py needs a CUDA GPU", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    path = Path(args.out) / config_name("matmul", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    only = set(args.shapes.split(",")) if args.shapes else None
    print(f"{name}\n| format | N x K | M | default us | best Triton us | config | dequant us |")
    print("|---|---|---:|---:|---:|---|---:|")
    for fmt in args.formats.split(","):
        qtype = GGMLQuantizationType[fmt]
        for shape in dict.fromkeys(SHAPES[fmt]):
            if only is not None and shape not in only:
                continue
            n, k = (int(v) for v in shape.split("x"))
            for bucket in sorted(int(b) for b in args.buckets.split(",")):
                gemm, dequant = shape_launches(qtype, n, k, bucket)
                default = mm.default_config(qtype, n, k, bucket, tuned=False)
                times = {default: time_us(gemm, default)}
                for cfg in candidates(bucket, qtype):
                    if cfg in times:
                        continue
                    try:
                        times[cfg] = time_us(gemm, cfg)
                    except Exception as e:  # a config the compiler rejects (out of resources)
                        print(
                            f"# {fmt} {shape} {bucket} {cfg}: {type(e).__name__}", file=sys.stderr
                        )
                best = min(times, key=times.get)
                dequant_us = time_us(dequant, None)
                mm.release_buffers()
                c = best
                tags = ("" if c.swap_ab else "/xW") + ("/ahead" if c.ahead else "")
                tags += "/quants" if c.quants else ""
                print(f"| {fmt} | {shape} | {bucket} | {times[default]:.1f} | {times[best]:.1f} | "
                      f"{c.block_m}/{c.block_n}/{c.block_k}/{c.num_warps}/{c.num_stages}{tags}"
                      f" | {dequant_us:.1f} |", flush=True)  # fmt: skip
                e = entry(best, times[best], dequant_us, times[default])
                merge(path, {fmt: {shape: {str(bucket): e}}})  # a run cut short keeps its data
                del gemm, dequant
                torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

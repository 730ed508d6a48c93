"""Kiln and llama.cpp side by side on the same GGUF files, in one run (decode, batch 1).

    python scripts/bench_vs_llama_cpp.py --peer .peer/run.sh \\
        --models qwen3-0.6b:q8_0,qwen3-8b:q4_k_m --depths 0,4096 -r 3 --dir /tmp/models

For each PRESET:TYPE it makes the file with `kiln make-model` (unless it is there), runs
llama.cpp's llama-bench (-ngl 99 -fa 1 -p 0 -n 128 -d DEPTHS -o json) and `kiln bench` with the
same tests (-o json), then prints one markdown table: t/s of both (mean ± sd), Kiln / llama.cpp,
and Kiln's GB/s and % of the memory floor. Extra `kiln bench` flags go after `--`, e.g.
`-- --fusion cuda_graphs=0`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_json(cmd: list[str], what: str) -> list[dict]:
    print(f"# {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"# {what} failed ({r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
        return []
    print(f"# {what}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    text = r.stdout.strip()
    return json.loads(text[text.index("[") :]) if "[" in text else []


def key(row: dict) -> tuple[int, int, int]:
    return int(row["n_prompt"]), int(row["n_gen"]), int(row["n_depth"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", required=True, help="llama.cpp's run.sh (../shared/peer/run.sh)")
    ap.add_argument("--models", required=True, help="PRESET:TYPE,... (kiln make-model presets)")
    ap.add_argument("--depths", default="0", help="KV depths, e.g. 0,4096")
    ap.add_argument("-n", "--n-gen", default="128")
    ap.add_argument("-r", "--repetitions", default="3")
    ap.add_argument("--dir", default="/tmp/kiln-models", help="where the GGUF files are made")
    ap.add_argument("kiln_args", nargs="*", help="extra kiln bench flags (after --)")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    lines = [
        "| model | test | llama.cpp t/s | Kiln t/s | Kiln / llama.cpp | Kiln GB/s | Kiln % floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for spec in args.models.split(","):
        preset, qtype = spec.split(":")
        path = Path(args.dir) / f"{preset}-{qtype}.gguf"
        if not path.exists():
            cmd = [sys.executable, "-m", "kiln", "make-model", "--preset", preset, "--type", qtype,
                   "-o", str(path)]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tests = ["-p", "0", "-n", args.n_gen, "-d", args.depths, "-r", args.repetitions]
        theirs = run_json(
            [args.peer, "llama-bench", "-m", str(path), "-ngl", "99", "-fa", "1", *tests,
             "-o", "json"], f"llama.cpp {spec}",
        )  # fmt: skip
        ours = run_json(
            [sys.executable, "-m", "kiln", "bench", "-m", str(path), *tests, "-o", "json",
             "--device", "cuda", "-q", *args.kiln_args], f"kiln {spec}",
        )  # fmt: skip
        by_key = {key(r): r for r in theirs}
        for row in ours:
            other = by_key.get(key(row))
            name = row.get("test") or f"tg{row['n_gen']}"
            lt = f"{other['avg_ts']:.1f} ± {other['stddev_ts']:.1f}" if other else "-"
            ratio = f"{row['avg_ts'] / other['avg_ts']:.2f}" if other else "-"
            gbps = f"{row['gbps']:.0f}" if row.get("gbps") else "-"
            floor = f"{row['floor_pct']:.1f}" if row.get("floor_pct") else "-"
            lines.append(
                f"| {preset} {qtype.upper()} | {name} | {lt} | "
                f"{row['avg_ts']:.1f} ± {row['stddev_ts']:.1f} | {ratio} | {gbps} | {floor} |"
            )
        print("\n".join(lines[-len(ours) :]) if ours else f"# no kiln rows for {spec}", flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kiln's cpu backend and llama.cpp on the CPU, side by side in one run: memory and speed.

    python scripts/bench_cpu.py                       # memory, pp512 / tg128 of both engines
    python scripts/bench_cpu.py --quality             # and the quality gate (KLD, perplexity)
    python scripts/bench_cpu.py --peer ../shared/peer/run-cpu.sh -t 2 -r 3

Measures, for the demo model (SmolLM2-135M-Instruct Q4_1) and stories260K:
- peak RSS of `kiln run` on the demo model (-n 128) less the peak RSS of a process that only
  imports kiln and torch, against 1.5 x the GGUF size + the KV cache `kiln run` allocates;
- pp512 and tg128 of `kiln bench` and llama.cpp's `llama-bench` (-t THREADS), the goals of
  issue 17 (demo: tg128 >= 0.8 x llama.cpp, pp512 >= llama.cpp; stories260K: tg128 >= 0.3 x);
- with --quality: mean KL divergence and top-1 agreement against the float32 reference (goals
  < 2e-3, >= 99%), measured as llama.cpp does (`kiln ppl --kl-divergence`: -c 512, 2 chunks,
  the last 256 tokens of each scored: 512 tokens; llama.cpp's own llama-perplexity against the
  same base beside it) and over every position of one 512-token prompt; and `kiln ppl` (-c 512,
  20 chunks) against llama.cpp's llama-perplexity on the same file (goal: within 0.3%).
The load average is printed before and after: on a shared machine the timings are only as good
as it is quiet. Goals are reported as measured, never adjusted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def log(line: str) -> None:
    print(f"# {line}", file=sys.stderr, flush=True)


# Peak RSS is the child's ru_maxrss, which on Linux starts at the RSS of the process that spawned
# it (the spawned copy's high-water mark survives exec): spawned from this script once it has
# imported torch, even `python -c pass` reads about 225 MB. So children are spawned by this small
# launcher (a bare interpreter, ~10 MB), below any peak measured here.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def peak_rss_mb(cmd: list[str]) -> tuple[float, int]:
    """Run cmd; -> (its peak resident set in MB, exit status)."""
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        log(f"launcher failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
        return float("nan"), r.returncode or 1
    kib, code = (int(v) for v in r.stdout.split()[-2:])
    if code != 0:
        log(f"failed ({code}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return kib / 1024, code  # Linux: KiB


def run_json(cmd: list[str], what: str) -> list[dict]:
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"{what} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return []
    log(f"{what}: {time.time() - t0:.0f} s")
    text = r.stdout.strip()
    return json.loads(text[text.index("[") :]) if "[" in text else []


def speeds(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{"pp512": (mean t/s, sd), "tg128": ...} of kiln bench / llama-bench JSON rows."""
    out = {}
    for r in rows:
        n_p, n_g = int(r["n_prompt"]), int(r["n_gen"])
        test = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        out[test] = (float(r["avg_ts"]), float(r["stddev_ts"]))
    return out


def kv_bytes(config, tokens: int, n_ctx: int) -> int:
    """The float32 KV pool `kiln run` holds for `tokens`: kiln/runtime/kv_pool.py's own growth
    from its first allocation, replayed on the meta device (nothing allocated), for the pool of
    LLM's default n_seq."""
    import inspect

    import torch

    from kiln.limits import kv_cache_bytes
    from kiln.llm import LLM
    from kiln.runtime.kv_pool import KVPool

    n_seq = inspect.signature(LLM).parameters["n_seq"].default
    pool = KVPool(config, n_ctx, n_seq, torch.device("meta"))
    pool.reserve(pool.new_sequence(), tokens)
    return kv_cache_bytes(config, pool.rows, torch.float32)


def memory(demo: Path, threads: int) -> list[str]:
    from kiln.gguf import read_gguf

    py = sys.executable
    base, _ = peak_rss_mb([py, "-c", "import torch, kiln"])
    cmd = [py, "-m", "kiln", "run", "-m", str(demo), "-p", PROMPT, "-n", "128", "--temp", "0",
           "--ignore-eos", "--device", "cpu", "-t", str(threads)]  # fmt: skip
    runs = {}
    for backend in ("cpu", "torch"):
        rss, code = peak_rss_mb([*cmd, "--backend", backend])
        runs[backend] = rss if code == 0 else float("nan")
    gguf = read_gguf(demo)
    from kiln.llm import DEFAULT_CTX

    n_ctx = min(DEFAULT_CTX, gguf.config.n_ctx_train)
    kv = kv_bytes(gguf.config, 64 + 128, n_ctx) / 1e6
    size = demo.stat().st_size / 1e6
    limit = 1.5 * size + kv
    lines = [
        f"demo model {demo.name}: {size:.1f} MB; KV cache of kiln run: {kv:.1f} MB; "
        f"a process importing kiln and torch: {base:.0f} MB peak RSS",
        "",
        "| backend | peak RSS MB | less the import-only process | limit (1.5 x file + KV) | met |",
        "|---|---:|---:|---:|---|",
    ]
    for backend, rss in runs.items():
        extra = rss - base
        met = "yes" if extra <= limit else "no"
        lines.append(f"| {backend} | {rss:.0f} | {extra:.0f} | {limit:.0f} | {met} |")
    return lines


def speed(models: dict[str, Path], peer: Path, threads: int, reps: int) -> list[str]:
    goals = {"demo": {"tg128": 0.8, "pp512": 1.0}, "stories260K": {"tg128": 0.3}}
    lines = [
        f"| model | test | llama.cpp t/s (-t {threads}) | Kiln cpu t/s (-t {threads}) | "
        f"Kiln / llama.cpp | goal | met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, path in models.items():
        common = ["-m", str(path), "-p", "512", "-n", "128", "-r", str(reps), "-o", "json"]
        peer_rows = run_json([str(peer), "llama-bench", *common, "-t", str(threads)], "llama.cpp")
        kiln_cmd = [sys.executable, "-m", "kiln", "bench", *common, "--device", "cpu",
                    "-t", str(threads), "-q"]  # fmt: skip
        kiln_rows = run_json(kiln_cmd, "kiln")
        ref, ours = speeds(peer_rows), speeds(kiln_rows)
        for test in ("pp512", "tg128"):
            if test not in ref or test not in ours:
                lines.append(f"| {name} | {test} | - | - | - | - | run failed |")
                continue
            ratio = ours[test][0] / ref[test][0]
            goal = goals[name].get(test)
            met = "-" if goal is None else ("yes" if ratio >= goal else "no")
            lines.append(
                f"| {name} | {test} | {ref[test][0]:.2f} ± {ref[test][1]:.2f} | "
                f"{ours[test][0]:.2f} ± {ours[test][1]:.2f} | {ratio:.2f} | "
                f"{'-' if goal is None else f'>= {goal}'} | {met} |"
            )
    return lines


def quality(demo: Path, peer: Path, threads: int, wiki: Path) -> list[str]:
    """KLD / top-1 of the cpu backend against the float32 reference (512 tokens), and the
    perplexity of both engines (-c 512, 20 chunks)."""
    import torch

    from kiln import LLM
    from kiln.bench.perplexity import kld_token_values

    text = wiki.read_text(encoding="utf-8")[:20000]
    llms = {b: LLM(demo, device="cpu", n_ctx=1024, backend=b, threads=threads, verbose=False)
            for b in ("torch", "cpu")}  # fmt: skip
    ids = llms["cpu"].tokenizer.encode(text, add_special=True)[:513]
    base = llms["torch"].logits(ids[:-1])
    ours = llms["cpu"].logits(ids[:-1])
    v = kld_token_values(ours, torch.log_softmax(base.double(), -1), ids[1:])
    lines = [
        f"quality against the float32 reference (`--backend torch`), every position of one "
        f"{len(ids) - 1}-token prompt of {wiki.name}: mean KLD {v.kld.mean():.2e} (max "
        f"{v.kld.max():.2e}), same top token {100 * v.same_top.mean():.2f}%",
    ]
    del llms
    lines += kld_as_llama_cpp(demo, peer, threads, wiki)
    ppl_args = ["-f", str(wiki), "-c", "512", "--chunks", "20"]
    kiln_cmd = [sys.executable, "-m", "kiln", "ppl", "-m", str(demo), *ppl_args,
                "--device", "cpu", "-t", str(threads), "--quiet"]  # fmt: skip
    found = {}
    for name, cmd in (
        ("kiln cpu", kiln_cmd),
        ("kiln torch", [*kiln_cmd, "--backend", "torch"]),
        (
            "llama.cpp",
            [str(peer), "llama-perplexity", "-m", str(demo), *ppl_args, "-t", str(threads)],
        ),  # fmt: skip
    ):
        log(f"{name}: {' '.join(cmd)}")
        r = subprocess.run(cmd, capture_output=True, text=True)
        out = r.stdout + r.stderr
        est = [ln for ln in out.splitlines() if "Final estimate: PPL" in ln]
        found[name] = float(est[-1].split("=")[1].split("+/-")[0]) if est else float("nan")
    peer_ppl = found["llama.cpp"]
    for name in ("kiln cpu", "kiln torch"):
        diff = 100 * (found[name] / peer_ppl - 1)
        lines.append(
            f"perplexity ({' '.join(ppl_args[2:])}): {name} {found[name]:.4f}, llama.cpp "
            f"{peer_ppl:.4f}: {diff:+.2f}%" + (" (goal: within 0.3%)" if name == "kiln cpu" else "")
        )
    return lines


def kld_as_llama_cpp(demo: Path, peer: Path, threads: int, wiki: Path) -> list[str]:
    """The float32 reference's log-probs saved in llama.cpp's base format (-c 512, 2 chunks),
    then `kiln ppl --kl-divergence` (cpu backend) and llama.cpp's llama-perplexity against it."""
    import tempfile

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "reference.kld"
        args = ["-m", str(demo), "-c", "512", "--chunks", "2", "--kl-divergence-base", str(base)]
        kiln = [sys.executable, "-m", "kiln", "ppl", *args, "--device", "cpu", "-t",
                str(threads), "--quiet"]  # fmt: skip
        log(f"reference base: {' '.join(kiln)}")
        subprocess.run([*kiln, "-f", str(wiki), "--backend", "torch"], capture_output=True)
        for name, cmd in (
            ("kiln cpu", [*kiln, "--kl-divergence"]),
            (
                "llama.cpp",
                [str(peer), "llama-perplexity", *args, "--kl-divergence", "-t", str(threads)],
            ),  # fmt: skip
        ):
            log(f"{name}: {' '.join(cmd)}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            out = (r.stdout + r.stderr).splitlines()
            kld = [ln.split(":")[1].split()[0] for ln in out if ln.startswith("Mean    KLD")]
            top = [ln.split(":")[1].strip() for ln in out if ln.startswith("Same top p")]
            lines.append(
                f"as llama.cpp measures it (-c 512, 2 chunks: 512 scored tokens), {name} against "
                f"the float32 reference: mean KLD {kld[-1] if kld else '?'} (goal < 2e-3), same "
                f"top token {top[-1] if top else '?'} (goal >= 99%)"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", default=str(SHARED / "peer" / "run-cpu.sh"),
                    help="llama.cpp's CPU runner (../shared/peer/run-cpu.sh)")  # fmt: skip
    ap.add_argument("-t", "--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--stories", default=str(SHARED / "models" / "stories260K.gguf"))
    ap.add_argument("--wiki", default=str(SHARED / "data" / "wiki.test.raw"))
    ap.add_argument("--quality", action="store_true", help="also the KLD and perplexity gate")
    ap.add_argument("--no-speed", action="store_true", help="skip pp512 / tg128")
    args = ap.parse_args()

    from kiln.hub import resolve_model
    from kiln.ops.cpu import physical_cores

    threads = args.threads or physical_cores()
    demo = resolve_model("smollm2-135m")
    peer = Path(args.peer)
    load = os.getloadavg()
    sections = [f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                f"({os.cpu_count()} CPUs); threads: {threads}", ""]  # fmt: skip
    sections += memory(demo, threads) + [""]
    if not args.no_speed:
        models = {"demo": demo, "stories260K": Path(args.stories)}
        sections += speed(models, peer, threads, args.repetitions) + [""]
    if args.quality:
        sections += quality(demo, peer, threads, Path(args.wiki)) + [""]
    load = os.getloadavg()
    sections.append(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())

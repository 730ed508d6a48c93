#!/usr/bin/env python3
"""Benchmark this commit on a GPU machine: the standard set, recorded in the performance history.

    python scripts/bench_standard.py                 # on CUDA, into bench/history.jsonl
    kiln history compare HEAD~1 HEAD                 # then: what changed

The standard set (not run in CI; about 10-20 minutes on an H100 with the reference path):
- synthetic models of real shapes: qwen3-0.6b q8_0, qwen3-8b q4_k_m, qwen3-8b q8_0,
  qwen3-30b-a3b q4_k_m, llama3-8b q4_0; each at pp512, tg128 and tg128 @ d4096, built once and
  measured as `kiln bench` measures (kiln.bench.llama_bench);
- perplexity of the demo model (smollm2-135m) on WikiText-2 (../shared/data/wiki.test.raw),
  n_ctx 512, as `kiln ppl` computes it: its speed and its PPL go into the history too.

Each result is printed as kiln bench's markdown row and appended to the history (--history PATH,
$KILN_HISTORY, else bench/history.jsonl at the git top level). A model that fails (e.g. out of
memory) is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from kiln.bench import env, history  # noqa: E402
from kiln.bench import llama_bench as B  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

MODELS = (
    "synthetic:qwen3-0.6b:q8_0",
    "synthetic:qwen3-8b:q4_k_m",
    "synthetic:qwen3-8b:q8_0",
    "synthetic:qwen3-30b-a3b:q4_k_m",
    "synthetic:llama3-8b:q4_0",
)
WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"
PPL_CTX = 512


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("-r", "--reps", type=int, default=5, help="repetitions per test (default 5)")
    p.add_argument("--history", help="history file (default: bench/history.jsonl at the top)")
    p.add_argument("--models", help="comma-separated -m values instead of the standard five")
    p.add_argument("-p", type=int, default=512, help="prompt size of the pp test (default 512)")
    p.add_argument("-n", type=int, default=128, help="tokens of the tg tests (default 128)")
    p.add_argument("-d", type=int, default=4096, help="depth of the deep tg test (default 4096)")
    p.add_argument("--ppl-file", default=str(WIKI), help="text for the perplexity run")
    p.add_argument("--ppl-chunks", type=int, default=50, help="chunks of 512 (default 50)")
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity run")
    p.add_argument("--no-record", action="store_true", help="print only, record nothing")
    return p.parse_args(argv)


def tests_of(model: str, a: argparse.Namespace) -> list[B.TestInstance]:
    nb, nub = B.DEFAULT_N_BATCH[0], B.DEFAULT_N_UBATCH[0]
    return [
        B.TestInstance(model, a.p, 0, 0, nb, nub),  # pp512
        B.TestInstance(model, 0, a.n, 0, nb, nub),  # tg128
        B.TestInstance(model, 0, a.n, a.d, nb, nub),  # tg128 @ d4096
    ]


def bench_models(a: argparse.Namespace, device, record) -> list[str]:
    """Run the three tests of each model; -> the models that failed."""
    models = a.models.split(",") if a.models else list(MODELS)
    runner = B.Runner(device, a.backend, a.reps, progress=B.Progress(prefix="bench_standard"))
    params = B.BenchParams(models=tuple(models), device=a.device, backend=a.backend)
    printer = B.MarkdownPrinter(sys.stdout, B.md_columns(params, device))
    printer.header()
    failed = []
    for model in models:
        try:
            results = B.run_tests(runner, tests_of(model, a), printer.row)
        except (KilnError, RuntimeError) as e:  # out of memory and the like: go on with the next
            runner.progress.clear()
            print(f"bench_standard: {model} failed: {e}", file=sys.stderr)
            failed.append(model)
            continue
        record(results)
    B.free_memory(device)
    printer.footer(runner)
    return failed


def ppl_record(a: argparse.Namespace, device) -> dict:
    """Perplexity of the demo model as `kiln ppl -c 512 --chunks N` computes it, as a record."""
    from kiln.bench import perplexity as P
    from kiln.bench.models import describe
    from kiln.hub import DEMO_MODEL
    from kiln.llm import LLM

    llm = LLM(DEMO_MODEL, device=str(device), n_ctx=PPL_CTX, backend=a.backend)
    text = P.read_text(a.ppl_file)
    result = P.perplexity(llm, text, PPL_CTX, a.ppl_chunks)
    n_chunks = len(result.chunks)
    ts = n_chunks * PPL_CTX / result.seconds  # tokens evaluated per second
    print(f"\nppl: {DEMO_MODEL} on {Path(a.ppl_file).name}, {n_chunks} chunks of {PPL_CTX}: "
          f"{result.summary()} ({ts:.1f} tokens/s)")  # fmt: skip
    return {
        "model_filename": str(llm.path),
        "model_type": describe(llm.gguf),
        "model_size": llm.gguf.tensor_bytes,
        "model_n_params": llm.gguf.n_params,
        "backends": a.backend,
        "n_batch": PPL_CTX,
        "n_ubatch": llm.engine.ubatch,
        "n_prompt": PPL_CTX,
        "n_gen": 0,
        "n_depth": 0,
        "avg_ts": ts,
        "stddev_ts": 0.0,
        "samples_ts": [ts],
        "test": f"ppl c{PPL_CTX}",
        "device": str(device),
        "ppl": result.ppl,
        "ppl_err": result.ppl_err,
        "ppl_chunks": n_chunks,
        "ppl_file": Path(a.ppl_file).name,
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        device = B.pick_device(a.device)
        path = None if a.no_record else history.history_path(a.history)
    except KilnError as e:
        print(f"bench_standard: error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    command = env.command_line()
    git = env.git_state(ignore=(path,) if path else ())
    n_recorded = 0

    def record(results) -> None:
        nonlocal n_recorded
        if path is not None:
            recs = [
                history.make_record(r.fields(samples=True), git, device, command) for r in results
            ]
            n_recorded += history.append_records(path, recs)

    failed = bench_models(a, device, record)
    if not a.no_ppl:
        try:
            rec = ppl_record(a, device)
            rec["device_name"] = env.device_name(device)
            if path is not None:
                n_recorded += history.append_records(
                    path, [history.make_record(rec, git, device, command)]
                )
        except (KilnError, RuntimeError) as e:
            print(f"bench_standard: perplexity failed: {e}", file=sys.stderr)
            failed.append("ppl")
    where = f", {n_recorded} record(s) appended to {path}" if path else ""
    dirty = " (dirty tree)" if git.dirty else ""
    print(
        f"\nbench_standard: commit {git.short}{dirty} on {env.device_name(device)} in "
        f"{time.perf_counter() - start:.0f} s{where}",
        file=sys.stderr,
    )
    if failed:
        print(f"bench_standard: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

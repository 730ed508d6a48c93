"""`kiln bench`: prompt and generation throughput as llama.cpp's llama-bench measures it.

    kiln bench -m synthetic:qwen3-8b:q4_k_m -p 512 -n 128 -d 0,4096 --device cuda
    kiln bench -m model.gguf -ub 128,256,512 -o csv
    kiln bench -m synthetic:qwen3-8b:q4_k_m -n 128 -p 0 --fusion qkv_norm_rope=0,1
    kiln bench -m synthetic:qwen3-0.6b:q8_0 -n 128 -p 0 --record   # append to bench/history.jsonl
    kiln bench -m synthetic:qwen3-8b:q4_k_m -p 0 -n 128 -npl 1,2,4,8   # batched decode
    kiln bench -p 0 -n 128 -d 0,4096 -ctk f16,q8_0 -ctv f16,q8_0 --device cpu  # cache types

Every combination of the list flags' values is one test; the table goes to stdout, progress to
stderr. See docs/benchmarking.md for the method.
"""

from __future__ import annotations

import argparse

from kiln.cli import command
from kiln.commands.common import (
    BACKEND_HELP,
    add_cache_type_args,
    add_llama_cpp_flags,
    add_threads_arg,
    apply_threads,
)
from kiln.hub import DEMO_MODEL

LIST_HELP = "(list: 64,128 or ranges 64-512*2)"


def add_test_arguments(p: argparse.ArgumentParser, n_prompt: str, n_gen: str) -> None:
    """The flags that choose the tests; shared with `kiln ab`. Values stay strings here and are
    checked by kiln.bench.llama_bench (a bad one is a one-line error, not argparse's usage)."""
    p.add_argument(
        "-m",
        "--model",
        action="append",
        metavar="MODEL",
        help=f"GGUF file, known model name or synthetic:PRESET:TYPE[:LAYERS] (e.g. "
        f"synthetic:qwen3-8b:q4_k_m); repeatable, comma-separated (default {DEMO_MODEL})",
    )
    p.add_argument(
        "-p",
        "--n-prompt",
        action="append",
        metavar="N",
        help=f"prompt sizes {LIST_HELP} (default {n_prompt})",
    )
    p.add_argument(
        "-n",
        "--n-gen",
        action="append",
        metavar="N",
        help=f"generation sizes {LIST_HELP} (default {n_gen})",
    )
    p.add_argument(
        "-pg",
        action="append",
        metavar="PP,TG",
        help="prompt then generation, timed together (repeatable)",
    )
    p.add_argument(
        "-d",
        "--n-depth",
        action="append",
        metavar="N",
        help=f"tokens already in the KV cache {LIST_HELP} (default 0)",
    )
    p.add_argument("-r", "--repetitions", metavar="N", help="repetitions of each test (default 5)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--backend", default="auto", help=BACKEND_HELP)
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each test")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    add_llama_cpp_flags(p)  # -ngl, -fa: accepted with a note
    add_threads_arg(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_test_arguments(p, "512", "128")
    p.add_argument(
        "--fusion",
        action="append",
        metavar="NAME=0|1",
        help="set a fusion (repeatable); NAME=0,1 runs both, like a list flag (see kiln fusions)",
    )
    p.add_argument(
        "-b",
        "--batch-size",
        action="append",
        metavar="N",
        help=f"tokens per prefill call {LIST_HELP} (default 2048)",
    )
    p.add_argument(
        "-ub",
        "--ubatch-size",
        action="append",
        metavar="N",
        help=f"tokens per forward pass, at most -b {LIST_HELP} (default 512)",
    )
    p.add_argument(
        "-npl",
        "--n-parallel",
        action="append",
        metavar="N",
        help=f"parallel sequences, each with the test's sizes, decoded together; t/s is the "
        f"aggregate (llama-batched-bench's -npl) {LIST_HELP} (default 1)",
    )
    add_cache_type_args(p, more=" (list: f16,q8_0)")
    p.add_argument("-o", "--output", metavar="FMT", help="md (default), csv, json or jsonl")
    p.add_argument(
        "--record",
        action="store_true",
        help="append each result to the performance history (see --history)",
    )
    p.add_argument(
        "--history",
        metavar="PATH",
        help="history file for --record (default $KILN_HISTORY, else bench/history.jsonl at "
        "the git top level)",
    )


def bench_params(args: argparse.Namespace):
    """The checked BenchParams of `kiln bench`'s flags (UsageError on a bad one)."""
    from kiln.bench import llama_bench as B
    from kiln.fusion import parse_sweep

    return B.BenchParams(
        models=B.parse_models(args.model, DEMO_MODEL),
        n_prompt=B.parse_int_list(args.n_prompt, "-p", B.DEFAULT_N_PROMPT),
        n_gen=B.parse_int_list(args.n_gen, "-n", B.DEFAULT_N_GEN),
        n_pg=B.parse_pairs(args.pg),
        n_depth=B.parse_int_list(args.n_depth, "-d", B.DEFAULT_N_DEPTH),
        n_batch=B.parse_int_list(args.batch_size, "-b", B.DEFAULT_N_BATCH, minimum=1),
        n_ubatch=B.parse_int_list(args.ubatch_size, "-ub", B.DEFAULT_N_UBATCH, minimum=1),
        reps=B.parse_reps(args.repetitions),
        output=B.parse_output(args.output),
        device=args.device,
        backend=args.backend,
        warmup=not args.no_warmup,
        fusions=tuple(tuple(c.items()) for c in parse_sweep(args.fusion)),
        n_parallel=B.parse_parallel(args.n_parallel),
        type_k=B.parse_cache_types(args.cache_type_k, "-ctk"),
        type_v=B.parse_cache_types(args.cache_type_v, "-ctv"),
    )


@command(
    "bench", "Benchmark prompt and generation speed, as llama.cpp's llama-bench.", _add_arguments
)
def run(args: argparse.Namespace) -> int:
    import sys

    from kiln.bench import history
    from kiln.bench import llama_bench as B
    from kiln.errors import UsageError

    params = bench_params(args)  # every flag is checked before anything loads
    apply_threads(args)
    if args.history and not args.record:
        raise UsageError(
            f"--history {args.history} names the file --record appends to: add --record, or "
            f"leave --history out"
        )
    path = history.check_history_path(history.history_path(args.history)) if args.record else None
    recorded = 0

    def record(result: B.TestResult) -> None:
        # each result as soon as it is measured: a later failure (out of memory) loses none
        nonlocal recorded
        if path is not None:
            recorded += history.record_results([result], path, B.pick_device(params.device))

    B.run_bench(params, progress=B.Progress(quiet=args.quiet), on_result=record)
    if path is not None:
        print(f"kiln bench: recorded {recorded} result(s) in {path}", file=sys.stderr)
    return 0

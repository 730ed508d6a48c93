#!/usr/bin/env python3
"""Benchmark this commit: the standard set of speed and quality measurements, recorded in the
performance history when asked.

    python scripts/bench_standard.py --record        # on CUDA: into bench/history.jsonl, and
                                                     # docs/history.png redrawn
    kiln history compare HEAD~1 HEAD                 # then: what changed (exit 1 on a regression)

The standard set (not run in CI):
- speed, measured as `kiln bench` measures it (kiln.bench.llama_bench), on synthetic models of
  real shapes, each built once: qwen3-0.6b q8_0, qwen3-8b q4_k_m, qwen3-8b q8_0, qwen3-30b-a3b
  q4_k_m and llama3-8b q4_0, each at pp512, tg128 and tg128 @ d4096; the MoE model
  (qwen3-30b-a3b; any MoE model given to --models) also at pp4096 with -ub 512, the prompt path
  through the experts at a long prompt;
- quality of the demo model (smollm2-135m) on WikiText-2 (../shared/data/wiki.test.raw), in
  --ppl-chunks chunks of 512 tokens: its perplexity as `kiln ppl` computes it (test `ppl c512`: ppl
  and ppl_err, and the evaluation's tokens/s chunk by chunk past the first, which also compiles),
  and its KL divergence from the float32 reference (test `kld c512 vs torch`: kld, kld_err, top1
  and top1_err). For the KLD the demo model first runs with backend torch (Kiln's float32
  reference) on the same device over the same chunks and saves its log-probs to a temporary file
  (llama.cpp's base format, about 25 MB a chunk; removed at the end); then the backend measured
  (--backend, default auto: what a user gets) is compared with them
  (kiln.bench.perplexity.kl_divergence).

A speed record on a GPU also carries the GPU's state as its test ended (`gpu_state`: SM clock and
its maximum, power draw, temperature, from nvidia-smi: kiln.bench.env.gpu_state), so that a
throttled GPU's slower result is told from a slower commit.

Each result is printed: kiln bench's markdown rows, then a line each for the PPL and the KLD;
progress goes to stderr. Nothing is written unless --record is given (--no-record, the default, is
accepted for older command lines): then each result is appended to the history as it comes
(--history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level), and at the
end the history's plot (`kiln history plot`: --plot PATH, else docs/history.png at the git top
level of the history file's checkout) is drawn again from the whole file. A model or phase that
fails (e.g. out of memory) is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from kiln.bench import env, history  # noqa: E402
from kiln.bench import llama_bench as B  # noqa: E402
from kiln.bench import models as M  # noqa: E402
from kiln.errors import KilnError, UsageError  # noqa: E402
from kiln.ops import resolve_backend  # noqa: E402

MODELS = M.STANDARD_MODELS  # shared with `kiln tune`
WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"
PPL_CTX = 512
REFERENCE_BACKEND = "torch"  # the float32 reference the KLD is measured against
MOE_UBATCH = 512  # -ub of the MoE models' long prompt test


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument(
        "--backend", default="auto",
        help="the op backend measured (default auto: triton on CUDA, cpu on the CPU); the KLD "
        f"reference is always {REFERENCE_BACKEND}",
    )  # fmt: skip
    p.add_argument("-r", "--reps", type=int, default=5, help="repetitions per test (default 5)")
    p.add_argument("--models", help="comma-separated -m values instead of the standard five")
    p.add_argument("-p", type=int, default=512, help="prompt size of the pp test (default 512)")
    p.add_argument("-n", type=int, default=128, help="tokens of the tg tests (default 128)")
    p.add_argument("-d", type=int, default=4096, help="depth of the deep tg test (default 4096)")
    p.add_argument(
        "--moe-p", type=int, default=4096,
        help=f"prompt size of the MoE models' long prompt test at -ub {MOE_UBATCH} (default "
        "4096; 0: none)",
    )  # fmt: skip
    p.add_argument("--ppl-file", default=str(WIKI), help="text for the perplexity and the KLD")
    p.add_argument(
        "--ppl-chunks", type=int, default=50,
        help=f"chunks of {PPL_CTX} tokens for the perplexity and the KLD (default 50)",
    )  # fmt: skip
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity and the KLD")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument(
        "--record", action="store_true",
        help="append the results to the history and draw its plot again",
    )  # fmt: skip
    rec.add_argument(
        "--no-record", action="store_true",
        help="print only, write nothing (the default; kept for older command lines)",
    )  # fmt: skip
    p.add_argument(
        "--history", metavar="PATH",
        help="the history file of --record (default $KILN_HISTORY, else bench/history.jsonl at "
        "the git top level)",
    )  # fmt: skip
    p.add_argument(
        "--plot", metavar="PATH",
        help="the plot --record draws (default docs/history.png at the git top level of the "
        "history file's checkout)",
    )  # fmt: skip
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """UsageError for values that cannot run, before anything does."""
    for flag, value, least in (("-r", a.reps, 1), ("-p", a.p, 1), ("-n", a.n, 1),
                               ("-d", a.d, 0), ("--moe-p", a.moe_p, 0),
                               ("--ppl-chunks", a.ppl_chunks, 1)):  # fmt: skip
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--history", a.history), ("--plot", a.plot)):
        if value and not a.record:
            raise UsageError(f"{flag} says where --record writes: add --record, or leave it out")


def model_list(a: argparse.Namespace) -> list[str]:
    """The -m values of --models, else the standard five, each checked."""
    models = [m.strip() for m in a.models.split(",") if m.strip()] if a.models else list(MODELS)
    if not models:
        raise UsageError("--models needs at least one -m value")
    for m in models:
        M.check_model_value(m)
    return models


# -- speed -----------------------------------------------------------------------------------------
def tests_of(model: str, a: argparse.Namespace) -> list[B.TestInstance]:
    """pp512, tg128 and tg128 @ d4096; for a MoE model also pp4096 at -ub 512."""
    nb, nub = B.DEFAULT_N_BATCH[0], B.DEFAULT_N_UBATCH[0]
    tests = [B.TestInstance(model, a.p, 0, 0, nb, nub)]  # pp512
    if a.moe_p and M.model_facts(model).config.moe:
        tests.append(B.TestInstance(model, a.moe_p, 0, 0, nb, MOE_UBATCH))  # pp4096
    tests += [
        B.TestInstance(model, 0, a.n, 0, nb, nub),  # tg128
        B.TestInstance(model, 0, a.n, a.d, nb, nub),  # tg128 @ d4096
    ]
    return tests


def bench_models(a: argparse.Namespace, models: list[str], device, progress, record) -> list[str]:
    """Run the tests of each model, recording each model's results; -> the models that failed."""
    runner = B.Runner(device, a.backend, a.reps, progress=progress)
    params = B.BenchParams(models=tuple(models), device=a.device, backend=a.backend)
    printer = B.MarkdownPrinter(sys.stdout, B.md_columns(params, device))
    printer.header()
    failed = []
    states: list[dict | None] = []  # the GPU's clock, power and heat as each test ended

    def row(result) -> None:
        states.append(env.gpu_state(device))
        printer.row(result)

    for model in models:
        states.clear()
        try:
            tests = tests_of(model, a)
            B.check_tests(tests, device, a.backend)
            results = B.run_tests(runner, tests, row)
        except (KilnError, RuntimeError) as e:  # out of memory and the like: go on with the next
            runner.progress.clear()
            print(f"bench_standard: {model} failed: {e}", file=sys.stderr)
            failed.append(model)
            continue
        fields = [r.fields(samples=True) for r in results]
        for f, state in zip(fields, states):
            if state:
                f["gpu_state"] = state
        record(fields)
    B.free_memory(device)
    printer.footer(runner)
    return failed


# -- quality ---------------------------------------------------------------------------------------
def load_demo(device, backend: str, progress) -> Any:
    """The demo model (an LLM) on `device` with `backend`, its context one chunk."""
    from kiln.hub import DEMO_MODEL
    from kiln.llm import LLM

    progress.status(f"loading {DEMO_MODEL} ({resolve_backend(backend, device)})", keep=True)
    return LLM(DEMO_MODEL, device=str(device), n_ctx=PPL_CTX, backend=backend)


def demo_fields(llm: Any, device) -> dict[str, Any]:
    """The fields that name the demo model's runs in the history (its record_key with `test`)."""
    return {
        "model_filename": str(llm.path),
        "model_type": M.describe(llm.gguf),
        "model_size": llm.gguf.tensor_bytes,
        "model_n_params": llm.gguf.n_params,
        "backends": llm.model.ops.name,
        "n_batch": PPL_CTX,
        "n_ubatch": llm.engine.ubatch,
        "device": str(device),
    }


def chunk_rates(chunk_seconds: tuple[float, ...]) -> list[float]:
    """Tokens evaluated per second, chunk by chunk, the first chunk left out where there are
    more: it also compiles (or loads) the kernels of the demo model's shapes. Timed over all 50
    chunks, three commits with the same prompt kernels gave 3186, 4146 and 6077 tokens/s on one
    H100, one after the other: false SLOWERs in `kiln history compare` (session 14)."""
    steady = chunk_seconds[1:] or chunk_seconds
    return [PPL_CTX / t for t in steady]


def ppl_record(llm: Any, tokens: list[int], a: argparse.Namespace, device, progress) -> dict:
    """Perplexity of the demo model as `kiln ppl -c 512 --chunks N` computes it, as a record:
    ppl, ppl_err and the evaluation's speed."""
    from kiln.bench import perplexity as P

    what = f"ppl {llm.model.ops.name}"
    result = P.perplexity_of_tokens(
        llm, tokens, PPL_CTX, a.ppl_chunks,
        progress=lambda done, total, r: progress.status(
            f"{what}: chunk {done}/{total}, PPL {r.ppl:.4f}"
        ),
    )  # fmt: skip
    progress.clear()
    n_chunks = len(result.chunks)
    rates = chunk_rates(result.chunk_seconds)
    ts, sd = statistics.mean(rates), statistics.pstdev(rates)
    print(f"\nppl: {llm.path.name} ({llm.model.ops.name}) on {Path(a.ppl_file).name}, "
          f"{n_chunks} chunks of {PPL_CTX}: {result.summary()} "
          f"({ts:.1f} +- {sd:.1f} tokens/s)")  # fmt: skip
    return {
        **demo_fields(llm, device),
        "n_prompt": PPL_CTX,
        "n_gen": 0,
        "n_depth": 0,
        "avg_ts": ts,
        "stddev_ts": sd,
        "samples_ts": rates,
        "test": f"ppl c{PPL_CTX}",
        "ppl": result.ppl,
        "ppl_err": result.ppl_err if math.isfinite(result.ppl_err) else None,
        "ppl_chunks": n_chunks,
        "ppl_file": Path(a.ppl_file).name,
    }


def kld_record(llm: Any, tokens: list[int], a: argparse.Namespace, device, progress) -> dict:
    """KL divergence of the demo model on llm's backend from the float32 reference on the same
    device and chunks, as a record: kld, kld_err, top1, top1_err. The reference's log-probs go
    to a temporary folder, removed at the end."""
    from kiln.bench import perplexity as P

    n_chunks = P.count_chunks(len(tokens), PPL_CTX, a.ppl_chunks)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-standard-") as tmp:
        base = Path(tmp) / "reference.kld"
        save_reference(tokens, base, n_chunks, device, progress)
        what = f"kld {llm.model.ops.name} vs {REFERENCE_BACKEND}"
        stats = P.kl_divergence(
            llm, base, n_chunks=n_chunks,
            progress=lambda done, total, s: progress.status(
                f"{what}: chunk {done}/{total}, KLD {s.kld:.6f}"
            ),
        )  # fmt: skip
    progress.clear()
    print(f"kld: {llm.path.name} ({llm.model.ops.name}) against {REFERENCE_BACKEND}, the same "
          f"{n_chunks} chunks: mean KLD = {stats.kld:.6f} +/- {stats.kld_err:.6f}, same top-1 = "
          f"{100 * stats.same_top:.3f} +/- {100 * stats.same_top_err:.3f} %")  # fmt: skip
    return {
        **demo_fields(llm, device),
        "test": f"kld c{PPL_CTX} vs {REFERENCE_BACKEND}",
        "kld": stats.kld,
        "kld_err": stats.kld_err,
        "top1": stats.same_top,
        "top1_err": stats.same_top_err,
        "kld_tokens": stats.n_tokens,
        "kld_reference": REFERENCE_BACKEND,
        "ppl_chunks": n_chunks,
        "ppl_file": Path(a.ppl_file).name,
    }


def save_reference(tokens: list[int], path: Path, n_chunks: int, device, progress) -> None:
    """The demo model on the reference backend: its log-probs of the scored tokens to `path`."""
    from kiln.bench import perplexity as P

    ref = load_demo(device, REFERENCE_BACKEND, progress)
    what = f"kld reference {REFERENCE_BACKEND}"
    size = P.base_file_size(PPL_CTX, ref.config.n_vocab, n_chunks)
    progress.status(f"{what}: saving its log-probs ({size / 1e6:.0f} MB, temporary)", keep=True)
    P.save_kld_base_of_tokens(
        ref, tokens, path, PPL_CTX, n_chunks,
        progress=lambda done, total, r: progress.status(f"{what}: chunk {done}/{total}"),
    )  # fmt: skip
    progress.clear()
    del ref
    B.free_memory(device)


def measure_quality(a: argparse.Namespace, text: str, device, progress, record) -> list[str]:
    """The demo model's PPL and KLD records; -> the phases that failed."""
    from kiln.bench import perplexity as P

    try:
        llm = load_demo(device, a.backend, progress)
        tokens = P.tokenize(llm.tokenizer, text)
    except (KilnError, RuntimeError) as e:
        print(f"bench_standard: loading the demo model failed: {e}", file=sys.stderr)
        return ["ppl", "kld"]
    failed = []
    for name, phase in (("ppl", ppl_record), ("kld", kld_record)):
        try:
            record([phase(llm, tokens, a, device, progress)])
        except (KilnError, RuntimeError) as e:
            progress.clear()
            print(f"bench_standard: {name} failed: {e}", file=sys.stderr)
            failed.append(name)
    return failed


# -- recording -------------------------------------------------------------------------------------
class Recorder:
    """Appends records to the history as they come (when recording), and counts them."""

    def __init__(self, path: Path | None, plot_path: Path | None, device):
        self.path, self.plot_path, self.device = path, plot_path, device
        self.git = env.git_state(ignore=tuple(p for p in (path, plot_path) if p is not None))
        self.command = env.command_line()
        self.count = 0

    def __call__(self, fields: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        git, dev, cmd = self.git, self.device, self.command
        records = [history.make_record(f, git, dev, cmd) for f in fields]
        self.count += history.append_records(self.path, records)

    def draw(self) -> Path | None:
        """The history's plot, drawn again from the whole file (when recording and something
        was recorded) -> its path, or None."""
        if self.path is None or self.plot_path is None or not self.count:
            return None
        return history.plot(history.load_history(self.path), self.plot_path)


def record_paths(a: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(the history file, its plot) for --record, both checked; (None, None) without it."""
    if not a.record:
        return None, None
    path = history.check_history_path(history.history_path(a.history))
    plot_path, _ = history.check_plot_output(a.plot or history.default_plot_path(path))
    return path, plot_path


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        check_args(a)
        models = model_list(a)
        device = B.pick_device(a.device)
        resolve_backend(a.backend, device)  # a backend the device cannot run fails here
        path, plot_path = record_paths(a)
        if not a.no_ppl:
            from kiln.bench.perplexity import read_text

            text = read_text(a.ppl_file)
    except KilnError as e:
        print(f"bench_standard: error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    progress = B.Progress(prefix="bench_standard")
    record = Recorder(path, plot_path, device)
    failed = bench_models(a, models, device, progress, record)
    if not a.no_ppl:
        failed += measure_quality(a, text, device, progress, record)
    drawn = ""
    try:
        plot = record.draw()
        drawn = f"; {plot} drawn" if plot else ""
    except KilnError as e:
        print(f"bench_standard: drawing the plot failed: {e}", file=sys.stderr)
        failed.append("plot")
    where = f", {record.count} record(s) appended to {path}" if path else ""
    dirty = " (dirty tree)" if record.git.dirty else ""
    print(
        f"\nbench_standard: commit {record.git.short}{dirty} on {env.device_name(device)} in "
        f"{time.perf_counter() - start:.0f} s{where}{drawn}",
        file=sys.stderr,
    )
    if failed:
        print(f"bench_standard: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

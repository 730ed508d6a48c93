"""`kiln ppl -f TEXT`: perplexity and KL divergence as llama.cpp's llama-perplexity measures them.

    kiln ppl -f wiki.test.raw -c 512 --chunks 20                      # PPL
    kiln ppl -m base.gguf -f wiki.test.raw --kl-divergence-base b.kld  # PPL, and save the base
    kiln ppl -m quant.gguf --kl-divergence-base b.kld --kl-divergence  # KLD of quant vs base

Results go to stdout in llama.cpp's format; progress and timings to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kiln.cli import command
from kiln.commands.common import add_model_args
from kiln.errors import UsageError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(
        p,
        ctx_help="tokens per chunk (default 512; with --kl-divergence, the base's)",
        ubatch_help="tokens per forward pass at most (default 512; see -b)",
    )
    p.add_argument(
        "-f", "--file",
        help="the text to measure, e.g. wiki.test.raw (optional with --kl-divergence, which "
        "evaluates the base file's tokens; when given, it must be the base's text)",
    )  # fmt: skip
    p.add_argument(
        "--chunks", type=int, default=-1, help="evaluate at most this many chunks (default: all)"
    )
    p.add_argument(
        "-b", "--batch-size", type=int, default=2048,
        help="llama.cpp's logical batch (default 2048): a forward pass takes min(-b, -ub) tokens",
    )  # fmt: skip
    p.add_argument(
        "--kl-divergence-base", metavar="FILE",
        help="without --kl-divergence: save this model's log-probs of the scored tokens to FILE "
        "(llama.cpp's format); with it: the base to compare with",
    )  # fmt: skip
    p.add_argument(
        "--kl-divergence", action="store_true",
        help="compare this model with the base saved in --kl-divergence-base FILE",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@command("ppl", "Perplexity and KL divergence, as llama.cpp's llama-perplexity.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import perplexity as P

    # every flag and input file is checked before the model loads
    if args.batch_size <= 0:
        raise UsageError(f"the batch size (-b) must be > 0, got {args.batch_size}")
    if args.chunks == 0:
        raise UsageError("--chunks must be >= 1 (or negative for all)")
    if args.ctx_size is not None:
        P.check_ctx(args.ctx_size)
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise UsageError(
                "--kl-divergence needs --kl-divergence-base FILE, a base written first by "
                "kiln ppl -m BASE_MODEL -f TEXT --kl-divergence-base FILE"
            )
        base = P.read_kld_base(args.kl_divergence_base)
        text = P.read_text(args.file) if args.file else None
        if args.ctx_size is not None and args.ctx_size != base.n_ctx:
            raise UsageError(
                f"{base.path} was computed with a context of {base.n_ctx}, not {args.ctx_size}: "
                f"pass -c {base.n_ctx} or leave -c out"
            )
        return _kl_divergence(args, P, base, text)
    if not args.file:
        raise UsageError("give the text to measure with -f FILE (e.g. wiki.test.raw)")
    if args.kl_divergence_base:
        from kiln.fileio import check_output_path

        check_output_path(args.kl_divergence_base, "the KL-divergence base file")
    text = P.read_text(args.file)
    return _perplexity(args, P, text)


def _load(args: argparse.Namespace, n_ctx: int):
    from kiln.fusion import parse_overrides
    from kiln.llm import LLM

    return LLM(
        args.model,
        device=args.device,
        n_ctx=n_ctx,
        ubatch=min(args.batch_size, args.ubatch),  # llama.cpp: n_ubatch <= n_batch
        backend=args.backend,
        fusions=parse_overrides(args.fusion),
        threads=args.threads,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
    )


def _perplexity(args: argparse.Namespace, P: Any, text: str) -> int:
    n_ctx = args.ctx_size if args.ctx_size is not None else P.DEFAULT_CTX
    llm = _load(args, n_ctx)
    _info("perplexity: tokenizing the input ..")
    tokens = P.tokenize(llm.tokenizer, text)
    n_chunk = P.count_chunks(len(tokens), n_ctx, args.chunks)
    saving = args.kl_divergence_base is not None
    _info(
        f"perplexity: {len(tokens)} tokens; {n_chunk} chunks of {n_ctx}, the last "
        f"{P.n_scored(n_ctx)} of each scored; {llm.engine.ubatch} tokens per forward pass"
    )
    if saving:
        size = P.base_file_size(n_ctx, llm.config.n_vocab, n_chunk)
        _info(
            f"perplexity: saving the log-probs to {args.kl_divergence_base} ({size / 1e6:.1f} MB)"
        )
    bar = _Bar(n_chunk, args.quiet, "perplexity")
    # "[1]x,[2]y," streams to stdout, unless it would share a terminal line with the bar
    stream = not (bar.active and sys.stdout.isatty())

    def progress(done: int, total: int, result: Any) -> None:
        bar.update(done, result.seconds, f"PPL={result.ppl:.4f}")
        if stream:
            sys.stdout.write(f"[{done}]{result.chunks[-1]:.4f},")
            sys.stdout.flush()

    try:
        if saving:
            result = P.save_kld_base_of_tokens(
                llm, tokens, args.kl_divergence_base, n_ctx, n_chunk, progress=progress
            )
        else:
            result = P.perplexity_of_tokens(llm, tokens, n_ctx, n_chunk, progress=progress)
    finally:
        bar.close()
    print(result.chunk_line() if not stream else "")
    print(result.summary())
    _info(
        f"perplexity: {n_chunk} chunks in {result.seconds:.1f} s "
        f"({result.seconds / n_chunk:.2f} s per chunk, "
        f"{n_chunk * (n_ctx - 1) / result.seconds:.1f} tokens/s)"
    )
    if saving:
        _info(f"perplexity: wrote {args.kl_divergence_base}")
    return 0


def _kl_divergence(args: argparse.Namespace, P: Any, base: Any, text: str | None) -> int:
    llm = _load(args, base.n_ctx)
    P.check_kld_base(base, llm, text)
    n_chunk = base.n_chunk if args.chunks < 0 else min(args.chunks, base.n_chunk)
    _info(
        f"kl_divergence: {base.path}: {base.n_chunk} chunks of {base.n_ctx} tokens; "
        f"evaluating {n_chunk}"
    )
    bar = _Bar(n_chunk, args.quiet, "kl_divergence")
    bar.write(P.KLD_TABLE_HEADER)
    start = time.perf_counter()

    def progress(done: int, total: int, stats: Any) -> None:
        bar.write(stats.chunk_row(done))
        bar.update(done, time.perf_counter() - start, f"KLD={stats.kld:.5f}")

    try:
        stats = P.kl_divergence(llm, base, n_chunks=n_chunk, progress=progress)
    finally:
        bar.close()
    print()
    print(stats.report())
    seconds = time.perf_counter() - start
    _info(
        f"kl_divergence: {n_chunk} chunks in {seconds:.1f} s ({seconds / n_chunk:.2f} s per chunk)"
    )
    return 0


def _info(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Bar:
    """A tqdm bar on stderr when it is a terminal; otherwise llama.cpp's one line after the
    first chunk: "N seconds per pass - ETA M minutes"."""

    def __init__(self, total: int, quiet: bool, label: str):
        from tqdm import tqdm

        self.total, self.quiet, self.label = total, quiet, label
        self.tqdm = tqdm(
            total=total, unit="chunk", desc=label, file=sys.stderr, leave=False,
            disable=True if quiet else None,  # None: off when stderr is not a terminal
        )  # fmt: skip
        self.active = not self.tqdm.disable

    def update(self, done: int, seconds: float, postfix: str) -> None:
        if self.active:
            self.tqdm.set_postfix_str(postfix, refresh=False)
            self.tqdm.update(done - self.tqdm.n)
        elif done == 1 and not self.quiet:
            eta = seconds * (self.total - 1) / 60
            _info(f"{self.label}: {seconds:.2f} seconds per pass - ETA {eta:.2f} minutes")

    def write(self, line: str) -> None:
        """A whole line to stdout, above the bar."""
        if self.active:
            self.tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.tqdm.close()

"""`kiln history`: the performance history that `kiln bench --record` appends to.

    kiln history list                         # commits with records, oldest first
    kiln history compare HEAD~1 HEAD          # t/s of two commits side by side, slowdowns flagged
    kiln history plot -o perf.png             # t/s per test over the commits

The file: --history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level.
"""

from __future__ import annotations

import argparse

from kiln.cli import command
from kiln.errors import UsageError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--history", metavar="PATH",
        help="the history file (default $KILN_HISTORY, else bench/history.jsonl at the git top "
        "level)",
    )  # fmt: skip
    p.add_argument("--model", default="", help="only models whose name contains this")
    p.add_argument("--test", default="", help="only tests whose name contains this (e.g. tg128)")
    p.add_argument("--device", default="", help="only devices whose name contains this")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    lst = sub.add_parser("list", help="the commits with records, in the order recorded")
    _common(lst)
    cmp_ = sub.add_parser(
        "compare",
        help="t/s of two commits side by side; SLOWER where mean2 + sd2 < mean1 - sd1",
        description="t/s of REV1 and REV2 side by side, like llama.cpp's compare-llama-bench.py. "
        "A test is flagged SLOWER when mean2 + sd2 < mean1 - sd1 (sd: the sample standard "
        "deviation of the repetitions), FASTER when mean2 - sd2 > mean1 + sd1.",
    )
    cmp_.add_argument(
        "rev1", metavar="REV1", help="the baseline: commit prefix, branch, tag, HEAD~N"
    )
    cmp_.add_argument("rev2", metavar="REV2", help="the commit compared with it")
    cmp_.add_argument(
        "--dirty", action="store_true", help="use records measured on a dirty tree too"
    )
    _common(cmp_)
    plt = sub.add_parser("plot", help="t/s per test over the commits (PNG, matplotlib)")
    plt.add_argument(
        "-o", "--output", default="history.png", help="image file (default history.png)"
    )
    _common(plt)


@command("history", "The performance history: list, compare two commits, plot.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import history as H

    if not getattr(args, "action", None):
        raise UsageError("give an action: kiln history list | compare REV1 REV2 | plot -o OUT.png")
    path = H.history_path(args.history)
    records = H.load_history(path)
    filters = {"model": args.model, "test": args.test, "device": args.device}
    if args.action == "list":
        print(H.format_list(records, filters))
    elif args.action == "compare":
        repo = H.history_repo(path)
        a = H.resolve_rev(args.rev1, records, repo)
        b = H.resolve_rev(args.rev2, records, repo)
        comparison = H.compare(records, a, b, include_dirty=args.dirty, filters=filters)
        print(H.format_compare(comparison, H.rev_name(args.rev1, a), H.rev_name(args.rev2, b)))
    else:
        out = H.plot(records, args.output, filters)
        print(f"kiln history: wrote {out}")
    return 0

"""`kiln history`: the performance history that `kiln bench --record` and
`scripts/bench_standard.py --record` append to.

    kiln history list                         # commits with records, oldest first
    kiln history compare HEAD~1 HEAD          # speed and quality side by side, regressions flagged
    kiln history plot                         # t/s, PPL and KLD over the commits: docs/history.png

The file: --history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level.
`compare` exits with 1 when a row is flagged SLOWER or WORSE, 0 otherwise (an error is 1 too).
"""

from __future__ import annotations

import argparse

from kiln.cli import command
from kiln.errors import UsageError

COMPARE_RULES = (
    "Speed: a test is flagged SLOWER when mean2 + sd2 < mean1 - sd1 (mean and sample standard "
    "deviation of the pooled repetitions), FASTER when mean2 - sd2 > mean1 + sd1. Quality (records "
    "with ppl, kld or top1, e.g. from scripts/bench_standard.py): WORSE when the value moved the "
    "bad way (PPL and KLD up, top-1 down) by more than sqrt(err1^2 + err2^2), err being each "
    "side's uncertainty; BETTER when it moved the good way by more than that. Exit status: 1 when "
    "anything is flagged SLOWER or WORSE (or on an error), 0 otherwise, so CI and scripts can "
    "use it."
)


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
    lst = sub.add_parser(
        "list", help="the commits with records, in the history's order (build number, then time)"
    )
    _common(lst)
    cmp_ = sub.add_parser(
        "compare",
        help="speed and quality of two commits side by side; exits with 1 on SLOWER or WORSE",
        description="Speed (t/s) and quality (PPL, KLD, top-1, where records carry them) of REV1 "
        "and REV2 side by side, like llama.cpp's compare-llama-bench.py. " + COMPARE_RULES,
    )
    cmp_.add_argument(
        "rev1", metavar="REV1", help="the baseline: commit prefix, branch, tag, HEAD~N"
    )
    cmp_.add_argument("rev2", metavar="REV2", help="the commit compared with it")
    cmp_.add_argument(
        "--dirty", action="store_true", help="use records measured on a dirty tree too"
    )
    _common(cmp_)
    plt = sub.add_parser(
        "plot",
        help="t/s per test, PPL and KLD over the commits, in one image (matplotlib)",
        description="One figure over the commits in the history's order: a panel of t/s per test "
        "(error bars: one sd), then a panel of PPL and of KLD per test whose records carry them "
        "(error bars: their uncertainty); one line per model and device.",
    )
    plt.add_argument(
        "-o", "--output", metavar="FILE",
        help="image file; the format from its suffix (default docs/history.png at the git top "
        "level of the history file's checkout; outside one, the history's name with .png)",
    )  # fmt: skip
    _common(plt)


@command(
    "history",
    "The performance history: list, compare two commits (exit 1 on a regression), plot.",
    _add_arguments,
)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import history as H

    if not getattr(args, "action", None):
        raise UsageError("give an action: kiln history list | compare REV1 REV2 | plot [-o OUT]")
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
        return 1 if comparison.regressed else 0
    else:
        out = H.plot(records, args.output or H.default_plot_path(path), filters)
        print(f"kiln history: wrote {out}")
    return 0

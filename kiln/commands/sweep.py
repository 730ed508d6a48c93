"""`kiln sweep`: PP and TG speed against the depth of the KV cache, as ik_llama.cpp's
sweep-bench measures them, with plots that overlay saved runs and sweep-bench tables.

    kiln sweep -m model.gguf -c 8192 -ub 512                 # sweep-bench's table
    kiln sweep -m synthetic:llama3-8b:q4_k_m -c 4096 --save fused.jsonl --plot fused.png
    kiln sweep -m m.gguf --plot cmp.png --overlay base=unfused.jsonl --overlay ik=sweep-bench.md
    kiln sweep --plot-only cmp.png fused.jsonl unfused.jsonl llama-sweep.md   # no model run

The table (or JSON lines) goes to stdout; loading and the files written are told on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kiln.cli import command
from kiln.commands.common import add_model_args, apply_threads, check_cache_types
from kiln.errors import UsageError
from kiln.fusion import parse_overrides


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    for action in p._actions:  # add_model_args's help speaks of generation
        if action.dest == "model":
            action.help = (
                "GGUF file, known model name, or synthetic:PRESET:TYPE[:LAYERS] (random weights "
                "of a preset's shapes, e.g. synthetic:llama3-8b:q4_k_m); default smollm2-135m"
            )
        elif action.dest == "ctx_size":
            action.help = "the context the sweep fills (default: min(4096, the model's))"
        elif action.dest == "ubatch":
            action.help = "micro-batch: the PP tokens of each step, and the step (default 512)"
    p.add_argument(
        "-n", "--n-gen", type=int, default=None,
        help="TG tokens generated at each step (default: ubatch / 4, as sweep-bench)",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output-format", choices=("md", "jsonl"), default="md",
        help="md: sweep-bench's markdown table (default); jsonl: one JSON object per step",
    )  # fmt: skip
    p.add_argument("--save", metavar="FILE.jsonl", help="also write the run as JSON lines")
    p.add_argument("--plot", metavar="OUT.png", help="plot S_PP and S_TG against N_KV")
    p.add_argument(
        "--overlay", action="append", default=[], metavar="[LABEL=]FILE",
        help="a saved run (kiln sweep jsonl, sweep-bench markdown or jsonl, llama-bench -d "
        "markdown) to draw with this one; repeatable; labelled with the file name or LABEL",
    )  # fmt: skip
    p.add_argument(
        "--plot-only", metavar="OUT.png",
        help="run no model: plot the sweep files given after it (and --overlay) into OUT.png",
    )  # fmt: skip
    p.add_argument(
        "files", nargs="*", metavar="FILE",
        help="with --plot-only: the sweep files to plot ([LABEL=]FILE)",
    )  # fmt: skip
    p.add_argument("--label", help="this run's name in the plot (default: the model's)")
    p.add_argument("--title", help="the plot's title")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    p.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up PP and decode"
    )


@command(
    "sweep",
    "PP and TG speed against KV-cache depth, as ik_llama.cpp's sweep-bench; plots and overlays.",
    _add_arguments,
)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import plots
    from kiln.bench import sweep as S
    from kiln.bench.models import check_model_value

    if args.plot_only:
        return _plot_only(args, plots)
    if args.files:
        raise UsageError(
            f"{args.files[0]}: sweep files are read only with --plot-only OUT.png; "
            f"to draw them beside this run use --plot OUT.png --overlay FILE"
        )
    # every flag and file is checked before the model loads
    S.check_sweep_args(args.ctx_size, args.ubatch, args.n_gen)
    check_model_value(args.model)
    cache_types = check_cache_types(args)
    overlays = []
    if args.plot:
        plots.require_matplotlib()
        plots.check_plot_path(args.plot)
        overlays = plots.load_overlays(args.overlay)
    elif args.overlay:
        raise UsageError("--overlay draws on a plot: give --plot OUT.png too")
    if args.save:
        _check_writable(args.save)
    apply_threads(args)

    _info(f"sweep: loading {args.model} ..")
    start = time.perf_counter()
    fusions = parse_overrides(args.fusion)
    engine, name = S.load_engine(
        args.model, args.device, args.backend, args.ctx_size, args.ubatch, fusions, cache_types
    )
    _info(f"sweep: loaded in {time.perf_counter() - start:.1f} s")
    n_gen = args.n_gen if args.n_gen is not None else S.default_n_gen(args.ubatch)
    S.check_sweep_args(engine.n_ctx, args.ubatch, n_gen)
    info = S.SweepInfo(
        n_kv_max=engine.n_ctx, n_ubatch=args.ubatch, n_gen=n_gen, model=name,
        device=str(engine.device), backend=args.backend,
    )  # fmt: skip
    rows = S.run_and_print(
        engine, info, n_gen, output=args.output_format, save=args.save, seed=args.seed,
        warmup=not args.no_warmup,
    )  # fmt: skip
    if args.save:
        _info(f"sweep: saved {len(rows)} steps to {args.save}")
    if args.plot:
        label = args.label or _model_label(args.model)
        series = [plots.Series(label, rows), *overlays]
        plots.plot_sweeps(series, args.plot, title=args.title)
        _info(f"sweep: wrote {args.plot}")
    return 0


def _plot_only(args: argparse.Namespace, plots) -> int:
    if args.plot or args.save:
        flag = "--plot" if args.plot else "--save"
        raise UsageError(f"--plot-only runs no model, so {flag} has nothing to do: leave it out")
    specs = [*args.files, *args.overlay]
    if not specs:
        raise UsageError("--plot-only OUT.png needs sweep files to plot: --plot-only OUT.png A B")
    plots.require_matplotlib()
    plots.check_plot_path(args.plot_only)
    series = plots.load_overlays(specs)
    plots.plot_sweeps(series, args.plot_only, title=args.title)
    _info(f"sweep: wrote {args.plot_only} ({len(series)} series)")
    return 0


def _model_label(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else model


def _check_writable(path: str) -> None:
    from kiln.fileio import check_output_path

    check_output_path(path, "--save")


def _info(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

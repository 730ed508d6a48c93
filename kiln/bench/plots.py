"""Plots of benchmark results: S_PP and S_TG against the depth of the KV cache (kiln sweep),
several runs overlaid. matplotlib is imported on use, with the Agg canvas (no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.bench.sweep import SweepRow, read_sweeps
from kiln.errors import UsageError
from kiln.fileio import atomic_output, check_output_path


@dataclass(frozen=True)
class Series:
    label: str
    rows: list[SweepRow]


def require_matplotlib() -> None:
    """Fail early, before a long run, when plotting cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """The output file, checked before any work: a .png in a folder that exists, a new name or
    a regular file (kiln.fileio.check_output_path)."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UsageError(f"{p}: the plot is written as PNG; give a file name ending in .png")
    return check_output_path(p, "the plot")


def split_overlay(spec: str) -> tuple[str | None, Path]:
    """ "label=path" or "path" -> (label or None, path). An existing file named with "=" wins."""
    if not Path(spec).exists() and "=" in spec:
        label, path = spec.split("=", 1)
        if label and path:
            return label, Path(path)
    return None, Path(spec)


def load_overlays(specs: Sequence[str]) -> list[Series]:
    """Each spec a file (kiln sweep jsonl, sweep-bench markdown or jsonl, llama-bench markdown),
    labelled with its name less the suffix, or `label=path`. A file of several runs gives one
    series per run, named by what differs between them."""
    out = []
    for spec in specs:
        label, path = split_overlay(spec)
        base = label if label is not None else path.stem
        for run in read_sweeps(path):
            out.append(Series(f"{base} {run.name}" if run.name else base, run.rows))
    return out


def plot_sweeps(
    series: Sequence[Series], out_path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Two panels, S_PP and S_TG (tokens/s) against N_KV, one line per series -> a PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if not series:
        raise UsageError("nothing to plot: give a run or at least one sweep file")
    path = check_plot_path(out_path)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax_pp, ax_tg = fig.subplots(1, 2)
    for s in series:
        n_kv = [r.n_kv for r in s.rows]
        for ax, values in (
            (ax_pp, [r.speed_pp for r in s.rows]),
            (ax_tg, [r.speed_tg for r in s.rows]),
        ):
            if any(not math.isnan(v) for v in values):
                ax.plot(n_kv, values, marker="o", markersize=3, linewidth=1.5, label=s.label)
    for ax, name in ((ax_pp, "prompt processing"), (ax_tg, "generation")):
        kind = "PP" if ax is ax_pp else "TG"
        sizes = sorted({getattr(r, kind.lower()) for s in series for r in s.rows} - {0})
        size = f" ({kind} {', '.join(map(str, sizes))})" if sizes else ""
        ax.set_title(f"S_{kind}: {name}{size}")
        ax.set_xlabel("N_KV (tokens already in the KV cache)")
        ax.set_ylabel("tokens/s")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    with atomic_output(path, "wb", what="the plot") as f:
        fig.savefig(f, dpi=110, format="png")
    return path

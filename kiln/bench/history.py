"""The performance history: one JSON line per measured test, appended by `kiln bench --record`
(and scripts/bench_standard.py), read by `kiln history compare` and `kiln history plot`.

A record holds the test's llama-bench fields (model_filename, n_prompt, avg_ts, samples_ts, ...),
Kiln's (test, device_name, gbps, ...) and where it was measured: the git commit of Kiln's
checkout, whether the tree was dirty (tracked files modified, or files not yet tracked under
kiln/; the history file itself does not count), device name, driver, torch and triton versions,
the exact command line and a UTC timestamp.

The file: --history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level of
the current directory.

The comparison rule (`kiln history compare REV1 REV2`): each side's t/s is the mean and sample
standard deviation of all its repetitions (the samples of every record of that commit, pooled).
REV2 is flagged SLOWER when mean2 + sd2 < mean1 - sd1, and FASTER when mean2 - sd2 > mean1 + sd1:
only a change larger than the run-to-run spread of both sides is called one.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.bench import env
from kiln.errors import UsageError

ENV_VAR = "KILN_HISTORY"
DEFAULT_RELATIVE = Path("bench") / "history.jsonl"


# -- where -----------------------------------------------------------------------------------------
def history_path(path: str | os.PathLike[str] | None = None) -> Path:
    """--history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level."""
    if path:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    top = env.git_toplevel()
    if top is None:
        raise UsageError(
            f"the current directory is not inside a git checkout, so the default history file "
            f"(<repo>/{DEFAULT_RELATIVE}) has no place: pass --history PATH or set ${ENV_VAR}"
        )
    return top / DEFAULT_RELATIVE


# -- writing ---------------------------------------------------------------------------------------
def make_record(
    fields: dict[str, Any],
    git: env.GitState,
    device: Any,
    command: str,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """A history line: the test's fields plus where and when it was measured."""
    return {
        **fields,
        "commit": git.commit,
        "dirty": git.dirty,
        "device_name": fields.get("device_name") or env.device_name(device),
        "driver": env.driver(device),
        **env.versions(),
        "command": command,
        "timestamp": timestamp or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def append_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, sort_keys=False) + "\n" for r in records]
    with open(p, "a", encoding="utf-8") as f:
        f.writelines(lines)
    return len(lines)


def record_results(
    results: Sequence[Any],
    path: str | os.PathLike[str],
    device: Any,
    argv: list[str] | None = None,
) -> int:
    """Append each TestResult of a `kiln bench` run to the history at `path`."""
    git = env.git_state(ignore=(path,))
    command = env.command_line(argv)
    records = [make_record(r.fields(samples=True), git, device, command) for r in results]
    return append_records(path, records)


# -- reading ---------------------------------------------------------------------------------------
def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"no history at {p}: record some with kiln bench ... --record (or pass --history PATH)"
        )
    records = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{p}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(rec, dict) or "commit" not in rec or "avg_ts" not in rec:
                raise UsageError(f"{p}:{n}: not a history record (needs commit and avg_ts)")
            records.append(rec)
    if not records:
        raise UsageError(f"{p} holds no records yet")
    return records


def record_key(rec: dict[str, Any]) -> tuple:
    """What makes two records the same measurement: model, test, device, backend, batch sizes."""
    return (
        model_label(rec),
        rec.get("test") or _test_of(rec),
        rec.get("device_name", "-"),
        rec.get("backends", "-"),
        rec.get("n_batch"),
        rec.get("n_ubatch"),
    )


def model_label(rec: dict[str, Any]) -> str:
    name = str(rec.get("model_filename") or rec.get("model_type") or "?")
    return name if name.startswith("synthetic:") else Path(name).name


def _test_of(rec: dict[str, Any]) -> str:
    from kiln.bench.llama_bench import test_name

    return test_name(
        int(rec.get("n_prompt", 0)), int(rec.get("n_gen", 0)), int(rec.get("n_depth", 0))
    )


# -- revisions -------------------------------------------------------------------------------------
def resolve_rev(rev: str, records: Sequence[dict[str, Any]], repo: Path | None) -> str:
    """The recorded commit a REV names: anything git resolves (HEAD~2, a branch, a tag, a
    prefix) in `repo`, else a unique prefix of a recorded commit."""
    commits = list(dict.fromkeys(str(r["commit"]) for r in records))
    if repo is not None:
        full = env._git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], repo)
        if full:
            return full
    matches = [c for c in commits if c.lower().startswith(rev.lower())]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(f"{rev!r} is ambiguous: it begins {len(matches)} recorded commits")
    recent = ", ".join(c[:10] for c in commits[-5:])
    raise UsageError(f"{rev!r} names no commit of the history (recent: {recent})")


def history_repo(path: Path) -> Path | None:
    """The checkout that REVs are resolved in: the history file's, else Kiln's own."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return env.git_toplevel(parent) or env.git_toplevel(env.source_dir())


# -- statistics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float
    n: int  # repetitions pooled
    runs: int  # records

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.sd:.2f}"


def pooled(records: Sequence[dict[str, Any]]) -> Stat:
    """Mean and sample sd of every repetition of these records (their avg_ts and stddev_ts when
    a record carries no samples)."""
    samples: list[float] = []
    for r in records:
        samples += [float(s) for s in r.get("samples_ts") or []]
    if samples and all(r.get("samples_ts") for r in records):
        sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
        return Stat(statistics.fmean(samples), sd, len(samples), len(records))
    means = [float(r["avg_ts"]) for r in records]
    sds = [float(r.get("stddev_ts") or 0.0) for r in records]
    sd = math.sqrt(statistics.fmean(s * s for s in sds))
    if len(means) > 1:
        sd = max(sd, statistics.stdev(means))
    return Stat(statistics.fmean(means), sd, len(records), len(records))


def classify(a: Stat, b: Stat) -> str:
    """'SLOWER' / 'FASTER' when b is outside a's spread by more than its own, else ''."""
    if b.mean + b.sd < a.mean - a.sd:
        return "SLOWER"
    if b.mean - b.sd > a.mean + a.sd:
        return "FASTER"
    return ""


# -- compare ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareRow:
    key: tuple
    a: Stat | None
    b: Stat | None

    @property
    def speedup(self) -> float | None:
        if self.a is None or self.b is None or self.a.mean <= 0:
            return None
        return self.b.mean / self.a.mean

    @property
    def flag(self) -> str:
        return classify(self.a, self.b) if self.a and self.b else ""


@dataclass(frozen=True)
class Comparison:
    rev_a: str
    rev_b: str
    rows: list[CompareRow]
    skipped_dirty: int = 0

    @property
    def slowdowns(self) -> list[CompareRow]:
        return [r for r in self.rows if r.flag == "SLOWER"]


def _select(records, commit: str, dirty: bool, filters: dict[str, str]):
    chosen, skipped = [], 0
    for r in records:
        if str(r["commit"]) != commit or not _matches(r, filters):
            continue
        if r.get("dirty") and not dirty:
            skipped += 1
            continue
        chosen.append(r)
    return chosen, skipped


def _matches(rec: dict[str, Any], filters: dict[str, str]) -> bool:
    key = record_key(rec)
    values = {"model": key[0], "test": key[1], "device": key[2]}
    return all(v.lower() in values[k].lower() for k, v in filters.items() if v)


def compare(
    records: Sequence[dict[str, Any]],
    commit_a: str,
    commit_b: str,
    include_dirty: bool = False,
    filters: dict[str, str] | None = None,
) -> Comparison:
    filters = filters or {}
    ra, skip_a = _select(records, commit_a, include_dirty, filters)
    rb, skip_b = _select(records, commit_b, include_dirty, filters)
    if not ra or not rb:
        which = commit_a if not ra else commit_b
        hint = " (its records are dirty: pass --dirty to use them)" if skip_a or skip_b else ""
        raise UsageError(f"no records of commit {which[:10]} to compare{hint}")
    groups: dict[tuple, tuple[list, list]] = {}
    for r in ra:
        groups.setdefault(record_key(r), ([], []))[0].append(r)
    for r in rb:
        groups.setdefault(record_key(r), ([], []))[1].append(r)
    rows = [
        CompareRow(k, pooled(a) if a else None, pooled(b) if b else None)
        for k, (a, b) in groups.items()
    ]
    return Comparison(commit_a, commit_b, rows, skip_a + skip_b)


def format_compare(c: Comparison, name_a: str, name_b: str) -> str:
    """A table like llama.cpp's scripts/compare-llama-bench.py."""
    rows = c.rows
    vary = [len({r.key[i] for r in rows}) > 1 for i in range(6)]
    extra = [(3, "backend"), (4, "n_batch"), (5, "n_ubatch")]
    head = ["model", "test", "device"] + [t for i, t in extra if vary[i]]
    head += [f"t/s {name_a}", f"t/s {name_b}", "speedup", ""]
    body = []
    for r in rows:
        cells = [str(r.key[0]), str(r.key[1]), str(r.key[2])]
        cells += [str(r.key[i]) for i, _ in extra if vary[i]]
        sp = r.speedup
        cells += [str(r.a) if r.a else "-", str(r.b) if r.b else "-"]
        cells += [f"{sp:.2f}" if sp is not None else "-", r.flag]
        body.append(cells)
    n_num = 3  # t/s, t/s, speedup are right-aligned
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {len(head) - 1 - k for k in range(1, n_num + 1)}

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = [
        ("-" * (w - 1) + ":") if i in right else (":" + "-" * (w - 1)) for i, w in enumerate(widths)
    ]
    lines = [line(head), "| " + " | ".join(rule) + " |"]
    lines += [line(b) for b in body]
    n_slow = len(c.slowdowns)
    lines.append("")
    lines.append(
        f"{n_slow} slowdown(s) beyond the run-to-run spread (SLOWER: mean2 + sd2 < mean1 - sd1)"
        if n_slow
        else "no slowdown beyond the run-to-run spread (SLOWER: mean2 + sd2 < mean1 - sd1)"
    )
    if c.skipped_dirty:
        lines.append(f"{c.skipped_dirty} record(s) from dirty trees left out (--dirty uses them)")
    return "\n".join(lines)


def rev_name(rev: str, commit: str) -> str:
    """'HEAD~1 (1a2b3c4)' for a symbolic REV, the REV itself for a hash prefix."""
    return rev if commit.lower().startswith(rev.lower()) else f"{rev} ({commit[:7]})"


def format_list(records: Sequence[dict[str, Any]], filters: dict[str, str] | None = None) -> str:
    """The commits with records, in the order first recorded."""
    records = [r for r in records if _matches(r, filters or {})]
    if not records:
        raise UsageError("no records match the filters")
    lines = []
    for commit, dirty in commit_order(records):
        mine = [r for r in records if str(r["commit"]) == commit and bool(r.get("dirty")) == dirty]
        when = min(str(r.get("timestamp") or r.get("test_time") or "") for r in mine)
        devices = sorted({str(r.get("device_name", "-")) for r in mine})
        tests = sorted({record_key(r)[1] for r in mine}, key=_test_sort_key)
        lines.append(
            f"{commit_label(commit, dirty):<8}  {when:<20}  {len(mine):>3} record(s)  "
            f"{', '.join(devices)}: {', '.join(tests)}"
        )
    return "\n".join(lines)


# -- plot ------------------------------------------------------------------------------------------
def commit_order(records: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """(commit, dirty) in the order first recorded (timestamps are UTC ISO strings)."""
    first: dict[tuple[str, bool], str] = {}
    for r in records:
        k = (str(r["commit"]), bool(r.get("dirty")))
        ts = str(r.get("timestamp") or r.get("test_time") or "")
        if k not in first or ts < first[k]:
            first[k] = ts
    return sorted(first, key=lambda k: first[k])


def commit_label(commit: str, dirty: bool) -> str:
    return commit[:7] + ("+" if dirty else "")


def plot(
    records: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    filters: dict[str, str] | None = None,
) -> Path:
    """t/s over commits: one panel per test, one line per model + device, error bars = sd."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("kiln history plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if _matches(r, filters or {})]
    if not records:
        raise UsageError("no records match the filters")
    order = commit_order(records)
    x_of = {k: i for i, k in enumerate(order)}
    tests = sorted({record_key(r)[1] for r in records}, key=_test_sort_key)
    fig, axes = plt.subplots(
        len(tests), 1, figsize=(max(6.0, 0.6 * len(order) + 4), 3.2 * len(tests)), squeeze=False
    )
    for ax, test in zip(axes[:, 0], tests):
        lines: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
        for r in records:
            key = record_key(r)
            if key[1] != test:
                continue
            x = x_of[(str(r["commit"]), bool(r.get("dirty")))]
            lines.setdefault((key[0], key[2]), {}).setdefault(x, []).append(r)
        for (model, device), points in sorted(lines.items()):
            xs = sorted(points)
            stats = [pooled(points[x]) for x in xs]
            ax.errorbar(
                xs, [s.mean for s in stats], yerr=[s.sd for s in stats],
                marker="o", capsize=3, label=f"{model} ({device})",
            )  # fmt: skip
        ax.set_title(test)
        ax.set_ylabel("t/s")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([commit_label(*k) for k in order], rotation=45, ha="right")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("commit (in the order recorded; + = dirty tree)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _test_sort_key(test: str) -> tuple:
    return (
        0 if test.startswith("pp") and "+" not in test else 1 if test.startswith("tg") else 2,
        test,
    )

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
import stat
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.bench import env
from kiln.errors import UsageError
from kiln.fileio import append_to, atomic_output, check_output_path

ENV_VAR = settings.HISTORY.name
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


def check_history_path(path: str | os.PathLike[str]) -> Path:
    """The history file `--record` appends to, checked before anything runs: a new name or a
    regular file (its folder is made when missing), never a directory, device, FIFO or link."""
    p = Path(path)
    if not p.parent.exists():
        return p  # made by append_records; nothing there to be refused
    return check_output_path(p, "the history file")


def append_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Append records to the history, one JSON line each, in one locked write (two runs
    recording at once keep both their lines; see kiln.fileio.append_to)."""
    p = Path(path)
    lines = [json.dumps(r, sort_keys=False, allow_nan=False) + "\n" for r in records]
    if not lines:
        return 0
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the folder of the history file {p}: {e.strerror}") from None
    append_to(p, "".join(lines), "the history file")
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
# Bounds on what is read: a real history line is ~1.5 kB (with its samples), a file of 100k
# records ~150 MB. A longer line or a larger file is not a history (or needs trimming).
MAX_LINE_BYTES = 1 << 20
MAX_FILE_BYTES = 256 << 20

# Fields the history commands read, and what each must hold (None is allowed where listed).
_STR_FIELDS = ("model_filename", "model_type", "device_name", "backends", "test", "timestamp",
               "test_time", "fusions")  # fmt: skip
_INT_FIELDS = ("n_prompt", "n_gen", "n_depth", "n_batch", "n_ubatch", "n_parallel")


def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of the history file; a UsageError naming the file and line for anything
    that is not a history record (bad JSON, a wrong type, a line or file too large)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(
            f"no history at {p}: record some with kiln bench ... --record (or pass --history PATH)"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read the history {p}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        example = p / "history.jsonl"
        raise UsageError(f"the history {p} is a directory; give the file, e.g. {example}")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"the history {p} is not a regular file (a device or FIFO?)")
    if st.st_size > MAX_FILE_BYTES:
        raise UsageError(
            f"the history {p} holds {_bytes(st.st_size)}, more than the "
            f"{_bytes(MAX_FILE_BYTES)} Kiln reads; move old records to another file"
        )
    records = []
    try:
        with open(p, "rb") as f:
            n = 0
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                n += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise UsageError(
                        f"{p}:{n}: a line longer than {_bytes(MAX_LINE_BYTES)} is not a history "
                        f"record; the file is damaged (remove the line)"
                    )
                rec = _parse_line(p, n, raw)
                if rec is not None:
                    records.append(rec)
    except OSError as e:
        raise UsageError(f"cannot read the history {p}: {e.strerror}") from None
    if not records:
        raise UsageError(f"{p} holds no records yet")
    return records


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _parse_line(p: Path, n: int, raw: bytes) -> dict[str, Any] | None:
    where = f"{p}:{n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: not UTF-8 text (bad byte at column {e.start + 1})") from None
    if not line.strip():
        return None
    cut = "" if raw.endswith(b"\n") else " (the last line has no newline: a write cut short?)"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not a JSON line ({e.msg}){cut}") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply to be a history record") from None
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: not a history record (a JSON object with commit and avg_ts)")
    problem = _record_problem(rec)
    if problem:
        raise UsageError(f"{where}: not a history record: {problem}{cut}")
    return rec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _record_problem(rec: dict[str, Any]) -> str | None:
    """What is wrong with a record's fields (None: nothing)."""
    if "commit" not in rec or "avg_ts" not in rec:
        return "needs commit and avg_ts"
    if not isinstance(rec["commit"], str) or not rec["commit"]:
        return f"commit must be a non-empty string, not {rec['commit']!r:.40}"
    if not _is_number(rec["avg_ts"]):
        return f"avg_ts must be a finite number, not {rec['avg_ts']!r:.40}"
    if rec.get("stddev_ts") is not None and not _is_number(rec["stddev_ts"]):
        return f"stddev_ts must be a finite number, not {rec['stddev_ts']!r:.40}"
    samples = rec.get("samples_ts")
    if samples is not None and (
        not isinstance(samples, list) or not all(_is_number(x) for x in samples)
    ):
        return "samples_ts must be a list of finite numbers"
    if "dirty" in rec and not isinstance(rec["dirty"], (bool, type(None))):
        return f"dirty must be true or false, not {rec['dirty']!r:.40}"
    for key in _STR_FIELDS:
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"{key} must be a string, not {rec[key]!r:.40}"
    for key in _INT_FIELDS:
        v = rec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            return f"{key} must be an integer >= 0, not {v!r:.40}"
    return None


def record_key(rec: dict[str, Any]) -> tuple:
    """What makes two records the same measurement: model, test, device, backend, batch sizes.
    A test of B parallel sequences (kiln bench -npl) is its own test, `tg128 npl4`: an
    aggregate t/s never compares with a single sequence's (records without n_parallel: B = 1)."""
    npl = rec.get("n_parallel") or 1
    return (
        model_label(rec),
        (rec.get("test") or _test_of(rec)) + (f" npl{npl}" if npl != 1 else ""),
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

    out, fmt = check_plot_output(out)
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
    try:
        with atomic_output(out, "wb", what="the plot") as f:
            fig.savefig(f, dpi=100, format=fmt)
    finally:
        plt.close(fig)
    return out


def check_plot_output(out: str | os.PathLike[str]) -> tuple[Path, str]:
    """(the plot's path, its format from the suffix: png, svg, pdf, ...), checked before any
    work; the folder is made when missing."""
    from matplotlib.figure import Figure

    p = Path(out)
    formats = Figure().canvas.get_supported_filetypes()
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise UsageError(
            f"{p}: the plot format is taken from the file name's suffix; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the folder of the plot {p}: {e.strerror}") from None
    return check_output_path(p, "the plot"), fmt


def _test_sort_key(test: str) -> tuple:
    return (
        0 if test.startswith("pp") and "+" not in test else 1 if test.startswith("tg") else 2,
        test,
    )

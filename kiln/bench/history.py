"""The performance history: one JSON line per measured test, appended by `kiln bench --record`
and `scripts/bench_standard.py --record`, read by `kiln history compare` and `kiln history plot`.

A record holds the test's llama-bench fields (model_filename, n_prompt, avg_ts, samples_ts, ...),
Kiln's (test, device_name, gbps, ...) and where it was measured: the git commit of Kiln's
checkout, whether the tree was dirty (tracked files modified, or files not yet tracked under
kiln/; the history file and its plot do not count), device name, driver, torch and triton
versions, the exact command line and a UTC timestamp. A record may carry quality values, each
with its uncertainty (one standard error): `ppl`, `ppl_err` (perplexity, as kiln ppl computes
it), `kld`, `kld_err` (mean KL divergence against a reference) and `top1`, `top1_err` (the
fraction of tokens whose most likely next token is the reference's). A quality-only record (no
avg_ts) is a record too.

The file: --history PATH, else $KILN_HISTORY, else bench/history.jsonl at the git top level of
the current directory. Its plot: docs/history.png at the git top level of the history file's
checkout (beside it, named like it, for a history outside any checkout).

The comparison rules (`kiln history compare REV1 REV2`):
- speed: each side's t/s is the mean and sample standard deviation of all its repetitions (the
  samples of every record of that commit, pooled). REV2 is flagged SLOWER when
  mean2 + sd2 < mean1 - sd1, and FASTER when mean2 - sd2 > mean1 + sd1: only a change larger
  than the run-to-run spread of both sides is called one;
- quality: each side's value is the mean of its records' values, its uncertainty the mean of
  theirs (runs over the same text do not shrink it). REV2 is flagged WORSE when the value moved
  the bad way (PPL and KLD up, top-1 down) by more than sqrt(err1^2 + err2^2), BETTER when it
  moved the good way by more than that.
A comparison with a SLOWER or WORSE row has regressed (`kiln history compare` exits with 1).
"""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln import settings
from kiln.bench import env
from kiln.errors import UsageError
from kiln.fileio import append_to, atomic_output, check_output_path

ENV_VAR = settings.HISTORY.name
DEFAULT_RELATIVE = Path("bench") / "history.jsonl"
DEFAULT_PLOT_RELATIVE = Path("docs") / "history.png"


@dataclass(frozen=True)
class Metric:
    """A quality value a record may carry, and the field of its uncertainty (one standard
    error; a record without it counts it 0)."""

    name: str  # the record's field
    err_name: str  # the field of its uncertainty
    label: str  # in tables and plots
    higher_is_worse: bool
    digits: int  # decimals shown

    def format(self, value: float, err: float) -> str:
        return f"{value:.{self.digits}f} ± {err:.{self.digits}f}"


QUALITY = (
    Metric("ppl", "ppl_err", "PPL", higher_is_worse=True, digits=4),
    Metric("kld", "kld_err", "KLD", higher_is_worse=True, digits=6),
    Metric("top1", "top1_err", "top-1", higher_is_worse=False, digits=4),
)
_QUALITY_FIELDS = tuple(f for m in QUALITY for f in (m.name, m.err_name))


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


def default_plot_path(history_file: str | os.PathLike[str]) -> Path:
    """Where the history's plot goes unless told: docs/history.png at the git top level of the
    history file's checkout (committed beside it); for a history outside any checkout, the
    history's own name with .png, beside it."""
    p = Path(history_file)
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    top = env.git_toplevel(parent)
    return top / DEFAULT_PLOT_RELATIVE if top is not None else p.with_suffix(".png")


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
    git = env.git_state(ignore=(path, default_plot_path(path)))
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
    if "commit" not in rec or ("avg_ts" not in rec and not has_quality(rec)):
        return "needs commit and avg_ts (or, for a quality record, ppl, kld or top1)"
    if not isinstance(rec["commit"], str) or not rec["commit"]:
        return f"commit must be a non-empty string, not {rec['commit']!r:.40}"
    if "avg_ts" in rec and not _is_number(rec["avg_ts"]):
        return f"avg_ts must be a finite number, not {rec['avg_ts']!r:.40}"
    for key in _QUALITY_FIELDS:
        if rec.get(key) is not None and not _is_number(rec[key]):
            return f"{key} must be a finite number or null, not {rec[key]!r:.40}"
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


def has_speed(rec: dict[str, Any]) -> bool:
    return rec.get("avg_ts") is not None


def has_quality(rec: dict[str, Any], metric: Metric | None = None) -> bool:
    metrics = QUALITY if metric is None else (metric,)
    return any(rec.get(m.name) is not None for m in metrics)


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


@dataclass(frozen=True)
class Value:
    """A quality value of one commit and its uncertainty (one standard error)."""

    value: float
    err: float
    runs: int  # records


def pooled_value(records: Sequence[dict[str, Any]], metric: Metric) -> Value | None:
    """The mean of the records' values of `metric` and the mean of their uncertainties (a run
    repeated over the same text does not make the estimate more certain); None when none of
    them carries it."""
    mine = [r for r in records if r.get(metric.name) is not None]
    if not mine:
        return None
    values = [float(r[metric.name]) for r in mine]
    errs = [float(r.get(metric.err_name) or 0.0) for r in mine]
    return Value(statistics.fmean(values), statistics.fmean(errs), len(mine))


def classify_quality(metric: Metric, a: Value, b: Value) -> str:
    """'WORSE' when b moved the bad way (up for PPL and KLD, down for top-1) by more than
    sqrt(err_a^2 + err_b^2), 'BETTER' when it moved the good way by more than that, else ''."""
    change = b.value - a.value
    if not metric.higher_is_worse:
        change = -change
    uncertainty = math.hypot(a.err, b.err)
    if change > uncertainty:
        return "WORSE"
    if -change > uncertainty:
        return "BETTER"
    return ""


# -- compare ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareRow:
    """The speed of one test (record_key) in the two commits."""

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
class QualityRow:
    """One quality value of one test (record_key) in the two commits."""

    key: tuple
    metric: Metric
    a: Value | None
    b: Value | None

    @property
    def change(self) -> float | None:
        return None if self.a is None or self.b is None else self.b.value - self.a.value

    @property
    def flag(self) -> str:
        return classify_quality(self.metric, self.a, self.b) if self.a and self.b else ""


@dataclass(frozen=True)
class Comparison:
    rev_a: str
    rev_b: str
    rows: list[CompareRow]  # speed
    skipped_dirty: int = 0
    quality: list[QualityRow] = field(default_factory=list)

    @property
    def slowdowns(self) -> list[CompareRow]:
        return [r for r in self.rows if r.flag == "SLOWER"]

    @property
    def worse(self) -> list[QualityRow]:
        return [r for r in self.quality if r.flag == "WORSE"]

    @property
    def regressions(self) -> list[CompareRow | QualityRow]:
        """Every row flagged SLOWER or WORSE."""
        return [*self.slowdowns, *self.worse]

    @property
    def regressed(self) -> bool:
        """Whether anything is flagged SLOWER or WORSE (`kiln history compare` exits with 1)."""
        return bool(self.regressions)


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
    """The speed (records with avg_ts) and quality values (records with ppl, kld, top1) of
    each test in the two commits, each flagged by its rule (see the module docstring)."""
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
    rows = []
    quality = []
    for k, (a, b) in groups.items():
        a_speed, b_speed = [r for r in a if has_speed(r)], [r for r in b if has_speed(r)]
        if a_speed or b_speed:
            stat_a = pooled(a_speed) if a_speed else None
            rows.append(CompareRow(k, stat_a, pooled(b_speed) if b_speed else None))
        for m in QUALITY:
            qa, qb = pooled_value(a, m), pooled_value(b, m)
            if qa is not None or qb is not None:
                quality.append(QualityRow(k, m, qa, qb))
    return Comparison(commit_a, commit_b, rows, skip_a + skip_b, quality)


def format_compare(c: Comparison, name_a: str, name_b: str) -> str:
    """A table like llama.cpp's scripts/compare-llama-bench.py for the speed, then one of the
    quality values where records carry them, then a line per rule saying what was flagged."""
    keys = [r.key for r in c.rows] + [r.key for r in c.quality]
    vary = [len({k[i] for k in keys}) > 1 for i in range(6)]
    extra = [i for i in (3, 4, 5) if vary[i]]
    lines: list[str] = []
    if c.rows:
        lines += _speed_table(c.rows, extra, name_a, name_b) + [""]
    if c.quality:
        lines += _quality_table(c.quality, extra, name_a, name_b) + [""]
    n_slow = len(c.slowdowns)
    rule = "SLOWER: mean2 + sd2 < mean1 - sd1"
    lines.append(
        f"{n_slow} slowdown(s) beyond the run-to-run spread ({rule})"
        if n_slow
        else f"no slowdown beyond the run-to-run spread ({rule})"
    )
    if c.quality:
        n_worse = len(c.worse)
        rule = "WORSE: PPL or KLD up, top-1 down, by more than sqrt(err1^2 + err2^2)"
        lines.append(
            f"{n_worse} quality regression(s) beyond the uncertainty ({rule})"
            if n_worse
            else f"no quality regression beyond the uncertainty ({rule})"
        )
    if c.skipped_dirty:
        lines.append(f"{c.skipped_dirty} record(s) from dirty trees left out (--dirty uses them)")
    return "\n".join(lines)


_EXTRA_TITLES = {3: "backend", 4: "n_batch", 5: "n_ubatch"}


def _speed_table(rows: list[CompareRow], extra: list[int], name_a: str, name_b: str) -> list[str]:
    head = ["model", "test", "device"] + [_EXTRA_TITLES[i] for i in extra]
    head += [f"t/s {name_a}", f"t/s {name_b}", "speedup", ""]
    body = []
    for r in rows:
        sp = r.speedup
        cells = _key_cells(r.key, extra)
        cells += [str(r.a) if r.a else "-", str(r.b) if r.b else "-"]
        cells += [f"{sp:.2f}" if sp is not None else "-", r.flag]
        body.append(cells)
    return _table(head, body, n_num=3)


def _quality_table(rows: list[QualityRow], extra: list[int], name_a: str, name_b: str) -> list[str]:
    head = ["model", "test", "device"] + [_EXTRA_TITLES[i] for i in extra]
    head += ["quality", name_a, name_b, "change", ""]
    body = []
    for r in rows:
        m, ch = r.metric, r.change
        cells = _key_cells(r.key, extra) + [m.label]
        cells += [m.format(v.value, v.err) if v else "-" for v in (r.a, r.b)]
        cells += [f"{ch:+.{m.digits}f}" if ch is not None else "-", r.flag]
        body.append(cells)
    return _table(head, body, n_num=3)


def _key_cells(key: tuple, extra: list[int]) -> list[str]:
    return [str(key[0]), str(key[1]), str(key[2])] + [str(key[i]) for i in extra]


def _table(head: list[str], body: list[list[str]], n_num: int) -> list[str]:
    """A markdown table; the n_num columns before the last are numbers, right-aligned."""
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
    return [line(head), "| " + " | ".join(rule) + " |", *(line(b) for b in body)]


def rev_name(rev: str, commit: str) -> str:
    """'HEAD~1 (1a2b3c4)' for a symbolic REV, the REV itself for a hash prefix."""
    return rev if commit.lower().startswith(rev.lower()) else f"{rev} ({commit[:7]})"


def format_list(records: Sequence[dict[str, Any]], filters: dict[str, str] | None = None) -> str:
    """The commits with records, in the history's order (commit_order)."""
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
    """(commit, dirty) in the history's order: by build number (the commits up to it, which a
    speed record carries as llama-bench's build_number) where every commit has one, so that a
    commit measured later (a backfill) still sits where it belongs; then, and where a number is
    missing, in the order first recorded (timestamps are UTC ISO strings)."""
    first: dict[tuple[str, bool], str] = {}
    number: dict[tuple[str, bool], int] = {}
    for r in records:
        k = (str(r["commit"]), bool(r.get("dirty")))
        ts = str(r.get("timestamp") or r.get("test_time") or "")
        if k not in first or ts < first[k]:
            first[k] = ts
        number[k] = max(number.get(k, 0), int(r.get("build_number") or 0))
    if all(number.values()):
        return sorted(first, key=lambda k: (number[k], first[k]))
    return sorted(first, key=lambda k: first[k])


def commit_label(commit: str, dirty: bool) -> str:
    return commit[:7] + ("+" if dirty else "")


# The quality values plotted (top-1 is in compare's table only).
PLOTTED_QUALITY = tuple(m for m in QUALITY if m.name in ("ppl", "kld"))


@dataclass(frozen=True)
class Panel:
    """One subplot: a line per (model, device), a point per commit (x) as (value, error bar)."""

    title: str
    ylabel: str
    lines: dict[tuple[str, str], dict[int, tuple[float, float]]]


def plot(
    records: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    filters: dict[str, str] | None = None,
) -> Path:
    """One figure of subplots over the commits: t/s, one panel per test (error bars = sd); then
    PPL and KLD, one panel per test whose records carry them (error bars = their uncertainty).
    Each panel has one line per model + device."""
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
    panels = speed_panels(records, order) + quality_panels(records, order)
    if not panels:
        raise UsageError("nothing to plot: the matching records carry no t/s, PPL or KLD")
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 0.6 * len(order) + 4), 3.2 * len(panels)), squeeze=False
    )
    every_line = sorted({line for panel in panels for line in panel.lines})
    colors = {line: f"C{i % 10}" for i, line in enumerate(every_line)}  # one per line, all panels
    for ax, panel in zip(axes[:, 0], panels):
        _draw(ax, panel, order, colors)
    axes[-1, 0].set_xlabel("commit (in the history's order; + = dirty tree)")
    fig.tight_layout()
    try:
        with atomic_output(out, "wb", what="the plot") as f:
            fig.savefig(f, dpi=100, format=fmt)
    finally:
        plt.close(fig)
    return out


def speed_panels(records: Sequence[dict[str, Any]], order: list[tuple[str, bool]]) -> list[Panel]:
    """A panel per test of the records with a t/s: the pooled mean, error bars one sd."""
    speed = [r for r in records if has_speed(r)]
    panels = []
    for test in sorted({record_key(r)[1] for r in speed}, key=_test_sort_key):
        lines = {}
        for line, points in _points(speed, test, order).items():
            stats = {x: pooled(rs) for x, rs in points.items()}
            lines[line] = {x: (s.mean, s.sd) for x, s in stats.items()}
        panels.append(Panel(test, "t/s", lines))
    return panels


def quality_panels(records: Sequence[dict[str, Any]], order: list[tuple[str, bool]]) -> list[Panel]:
    """A panel per quality value (PPL, KLD) and test of the records that carry it: the value,
    error bars its uncertainty."""
    panels = []
    for m in PLOTTED_QUALITY:
        mine = [r for r in records if has_quality(r, m)]
        for test in sorted({record_key(r)[1] for r in mine}, key=_test_sort_key):
            lines = {}
            for line, points in _points(mine, test, order).items():
                values = {x: pooled_value(rs, m) for x, rs in points.items()}
                lines[line] = {x: (v.value, v.err) for x, v in values.items() if v is not None}
            panels.append(Panel(f"{m.label}: {test}", m.label, lines))
    return panels


def _points(
    records: Sequence[dict[str, Any]], test: str, order: list[tuple[str, bool]]
) -> dict[tuple[str, str], dict[int, list[dict[str, Any]]]]:
    """The records of `test`, by (model, device), then by x (the commit's place in `order`)."""
    x_of = {k: i for i, k in enumerate(order)}
    lines: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for r in records:
        key = record_key(r)
        if key[1] != test:
            continue
        x = x_of[(str(r["commit"]), bool(r.get("dirty")))]
        lines.setdefault((key[0], key[2]), {}).setdefault(x, []).append(r)
    return lines


def _draw(
    ax: Any, panel: Panel, order: list[tuple[str, bool]], colors: dict[tuple[str, str], str]
) -> None:
    for (model, device), points in sorted(panel.lines.items()):
        xs = sorted(points)
        ax.errorbar(
            xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs],
            marker="o", capsize=3, label=f"{model} ({device})", color=colors[(model, device)],
        )  # fmt: skip
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([commit_label(*k) for k in order], rotation=45, ha="right")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")


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
    """pp tests, then tg tests, then the rest (pp+tg, ppl, kld), each by name."""
    is_pp = test.startswith("pp") and test[2:3].isdigit() and "+" not in test
    return (0 if is_pp else 1 if test.startswith("tg") else 2, test)

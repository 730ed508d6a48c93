"""GGUF files: reading (memory-mapped), writing, and synthetic models built in memory."""

from __future__ import annotations

from kiln.gguf.model import GGUFModel, RawTensor
from kiln.gguf.reader import read_gguf

__all__ = ["GGUFModel", "RawTensor", "read_gguf"]

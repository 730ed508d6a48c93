"""Subcommands of `kiln`; importing a module registers its command with kiln.cli.command."""

from __future__ import annotations

import importlib

MODULES = (
    "info",
    "run",
    "chat",
    "make_model",
    "quantize",
    "ppl",
    "sweep",
    "bench",
    "ab",
    "history",
    "fusions",
    "tune",
    "serve",
)


def load_all() -> None:
    for name in MODULES:
        importlib.import_module(f"kiln.commands.{name}")

"""The KILN_ environment variables that are settings (the fusion toggles KILN_<FUSION> are in
kiln/fusion.py): each is declared here once and read through its Setting. A KILN_ variable that
is neither a setting nor a fusion toggle is an error (kiln.fusion.check_environment), so a typo
such as KILN_CAHCE or KILN_SWIGLUE=0 is never silently ignored."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str  # KILN_...
    summary: str

    def get(self) -> str | None:
        """The variable's value, None when it is unset or empty."""
        return os.environ.get(self.name) or None


SETTINGS: dict[str, Setting] = {}


def setting(name: str, summary: str) -> Setting:
    SETTINGS[name] = Setting(name, summary)
    return SETTINGS[name]


CACHE = setting(
    "KILN_CACHE",
    "the folder known models are fetched into (default $XDG_CACHE_HOME/kiln or ~/.cache/kiln)",
)
HISTORY = setting(
    "KILN_HISTORY",
    "the history file of kiln bench --record and kiln history (default bench/history.jsonl "
    "at the git top level)",
)
PEER = setting(
    "KILN_PEER",
    "the llama.cpp build folder that scripts/kquant_rmse.py runs (default /work/shared/peer)",
)

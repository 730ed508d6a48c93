"""Errors a user can cause. The CLI prints their message without a traceback and exits non-zero."""

from __future__ import annotations


class KilnError(Exception):
    """Base class: the message says what was wrong and what to do."""


class GGUFError(KilnError):
    """A GGUF file that cannot be read: bad magic, version, truncation, inconsistent tensors."""


class UnsupportedError(KilnError):
    """Something valid but not supported by Kiln: an architecture, a tensor type, an option."""


class ConfigError(KilnError):
    """Model metadata that is missing or contradicts itself."""


class ModelNotFoundError(KilnError):
    """A model name or path that does not resolve to a file."""


class UsageError(KilnError):
    """A bad command-line flag or API argument."""


class ModelOutputError(KilnError):
    """A model that computes NaN or infinite values (corrupt weights, overflow)."""

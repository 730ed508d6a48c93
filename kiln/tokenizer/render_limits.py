"""Bounds on rendering a chat template. A template comes from the model file, so it is untrusted
code: Jinja's sandbox keeps it from touching Python internals, but not from running for ever
(two nested `range(100000)` loops are 10^10 steps) or from making a string of gigabytes
(`'x' * 10**10`, `'{:>9999999999}'.format(1)`).

- Steps: every line the compiled template executes counts one step (a trace function is set on
  the rendering thread for the template's own code only, restored afterwards); past MAX_STEPS,
  or past MAX_SECONDS of wall time, the render stops. Real templates take a few thousand steps
  per message (Qwen3's with tools: ~50 a message).
- Output: at most MAX_OUTPUT_CHARS characters, far beyond any model's context.
- Sizes inside expressions: `*` and `**` whose result would exceed MAX_OUTPUT_CHARS (or a
  number of more than MAX_INT_BITS bits), padding and widths (str.ljust/center/zfill,
  `%` formatting, str.format, the center/indent/format/replace filters) above MAX_OUTPUT_CHARS.
Each stop raises TemplateLimitError naming the limit.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_STEPS = 5_000_000  # ~2-4 s of template code; a 1000-message chat needs well under 1%
MAX_SECONDS = 20.0
MAX_OUTPUT_CHARS = 8 << 20  # 8M characters: ~2M tokens, beyond any model's context
MAX_INT_BITS = 1 << 16
_TEMPLATE_FILE = "<template>"  # the file name Jinja compiles from_string templates under
# a number with as many digits as the output limit: a width or precision that may exceed it
_BIG_NUMBER = re.compile(r"\d{" + str(len(str(MAX_OUTPUT_CHARS))) + ",}")


class TemplateLimitError(Exception):
    """A render stopped at one of the limits; the message names it."""


def _too_long(n: int, what: str) -> TemplateLimitError:
    return TemplateLimitError(
        f"{what} would make {n} characters, more than the {MAX_OUTPUT_CHARS} a chat prompt may "
        f"have (kiln.tokenizer.render_limits.MAX_OUTPUT_CHARS)"
    )


def _check_width(n: Any, what: str) -> None:
    if isinstance(n, int) and n > MAX_OUTPUT_CHARS:
        raise _too_long(n, what)


def _check_format_string(fmt: Any, what: str) -> None:
    """A width or precision in a format string above the output limit."""
    if isinstance(fmt, str) and _BIG_NUMBER.search(fmt):
        raise TemplateLimitError(
            f"{what} {fmt[:60]!r} asks for a width or precision above {MAX_OUTPUT_CHARS} "
            f"characters (kiln.tokenizer.render_limits.MAX_OUTPUT_CHARS)"
        )


def _check_percent(fmt: Any, args: Any) -> None:
    _check_format_string(fmt, "the format")
    if isinstance(fmt, str) and "*" in fmt:
        for a in args if isinstance(args, tuple) else (args,):
            _check_width(a, "a '*' width")


def _check_repeat(left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0:
            if len(seq) * n > MAX_OUTPUT_CHARS:
                raise _too_long(len(seq) * n, "a repetition")


def _check_power(base: Any, exp: Any) -> None:
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        bits = abs(base).bit_length() * exp
        if bits > MAX_INT_BITS:
            raise TemplateLimitError(
                f"{base} ** {exp} would be a number of about {bits} bits, more than the "
                f"{MAX_INT_BITS} a template may compute (kiln.tokenizer.render_limits.MAX_INT_BITS)"
            )


_WIDTH_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs"}
# what Jinja passes a filter before its value (pass_environment / pass_context / pass_eval_context)
_PASSED = (jinja2.Environment, jinja2.runtime.Context, jinja2.nodes.EvalContext)


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The transformers sandbox, with the size checks above on operators, calls and filters."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        wrap = self._wrap_filter
        f = self.filters
        f["center"] = wrap(f["center"], lambda v, width=80, *a, **k: _check_width(width, "center"))
        f["indent"] = wrap(f["indent"], _check_indent)
        f["format"] = wrap(f["format"], lambda v, *a, **k: _check_percent(v, a))
        f["replace"] = wrap(f["replace"], _check_replace)

    @staticmethod
    def _wrap_filter(fn: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
        def checked(*args: Any, **kwargs: Any) -> Any:
            # filters that take the environment or context get it first: check the rest
            values = [a for a in args if not isinstance(a, _PASSED)]
            check(*values, **kwargs)
            return fn(*args, **kwargs)

        for attr in ("jinja_pass_arg",):  # pass_environment / pass_context / pass_eval_context
            if hasattr(fn, attr):
                setattr(checked, attr, getattr(fn, attr))
        return checked

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in _WIDTH_METHODS:
                for a in (*args, *kwargs.values()):
                    _check_width(a, f"str.{name}")
            elif name == "replace" and len(args) >= 2:
                _check_replace(owner, *args[:2])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = getattr(value, "__self__", None)
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(fmt, "the format string")
        return wrapped


def _check_indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> None:
    width = kwargs.get("width", width)
    size = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
    lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
    if size * lines > MAX_OUTPUT_CHARS:
        raise _too_long(size * lines, "an indent")


def _check_replace(s: Any, old: Any = "", new: Any = "", *args: Any, **kwargs: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        count = s.count(old) if old else len(s) + 1
        if len(s) + count * len(new) > MAX_OUTPUT_CHARS:
            raise _too_long(len(s) + count * len(new), "a replace")


class _StepCounter:
    """sys.settrace hook: counts the lines executed in template code; raises past the limits."""

    def __init__(self, max_steps: int, max_seconds: float):
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.steps = 0
        self.deadline = time.monotonic() + max_seconds

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_filename == _TEMPLATE_FILE:
            return self.line
        return None

    def line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.steps += 1
            if self.steps > self.max_steps:
                raise TemplateLimitError(
                    f"it ran more than {self.max_steps} steps (a loop that does not end, or "
                    f"loops nested too deep; kiln.tokenizer.render_limits.MAX_STEPS)"
                )
            if not self.steps & 0x3FF and time.monotonic() > self.deadline:
                raise TemplateLimitError(
                    f"it ran longer than {self.max_seconds:g} s "
                    f"(kiln.tokenizer.render_limits.MAX_SECONDS)"
                )
        return self.line


def render_bounded(
    template: jinja2.Template,
    context: dict[str, Any],
    max_steps: int | None = None,
    max_seconds: float | None = None,
    max_chars: int | None = None,
) -> str:
    """template.render(**context) within the limits (the module's defaults where None);
    TemplateLimitError when one is reached."""
    max_steps = MAX_STEPS if max_steps is None else max_steps
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds
    max_chars = MAX_OUTPUT_CHARS if max_chars is None else max_chars
    counter = _StepCounter(max_steps, max_seconds)
    previous = sys.gettrace()
    sys.settrace(counter)
    try:
        parts: list[str] = []
        n = 0
        for piece in template.generate(**context):
            n += len(piece)
            if n > max_chars:
                raise TemplateLimitError(
                    f"its output passed {max_chars} characters, more than a chat prompt may "
                    f"have (kiln.tokenizer.render_limits.MAX_OUTPUT_CHARS)"
                )
            parts.append(piece)
        return "".join(parts)
    finally:
        sys.settrace(previous)

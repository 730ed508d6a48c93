"""Chat templates (tokenizer.chat_template), rendered the way Hugging Face transformers does.

Same Jinja environment as transformers' chat_template_utils: ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; `raise_exception(msg)` and
`strftime_now(fmt)` as globals; `tojson` replaced by json.dumps without HTML escaping (ensure_ascii
False, with indent/separators/sort_keys); the `{% generation %}` block accepted (it only marks
assistant text for training masks there). Variables: messages, add_generation_prompt, tools,
documents, bos_token, eos_token, plus any extra keyword the caller passes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import KilnError, UnsupportedError, UsageError


class ChatTemplateError(KilnError):
    """A chat template that does not parse, or that refused the messages while rendering."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once (raises jinja2.TemplateSyntaxError)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _template_and_tokens(
    template_or_tokenizer: Any, template_name: str | None
) -> tuple[str, str, dict[str, str]]:
    """(template text, model name for messages, default special-token variables)."""
    from kiln.tokenizer.vocab import Tokenizer

    if isinstance(template_or_tokenizer, str):
        if template_name is not None:
            raise UsageError("template_name applies to a model or tokenizer, not a template text")
        return template_or_tokenizer, "the template", {}

    if isinstance(template_or_tokenizer, Tokenizer):
        tok = template_or_tokenizer
        name = tok.name
        default = tok.chat_template
        named = tok.chat_templates
        tokens = {}
        if tok.bos_token is not None:
            tokens["bos_token"] = tok.bos_token
        if tok.eos_token is not None:
            tokens["eos_token"] = tok.eos_token
    else:
        md = template_or_tokenizer
        if not isinstance(md, Mapping):
            md = getattr(template_or_tokenizer, "metadata", None)
        if not isinstance(md, Mapping):
            raise UsageError(
                "render_chat takes a template string, a Tokenizer, a GGUFModel or its metadata, "
                f"not {type(template_or_tokenizer).__name__}"
            )
        name = str(md.get("general.name") or getattr(template_or_tokenizer, "source", "model"))
        default = md.get("tokenizer.chat_template")
        prefix = "tokenizer.chat_template."
        named = {k[len(prefix) :]: v for k, v in md.items() if k.startswith(prefix)}
        tokens = {}
        texts = md.get("tokenizer.ggml.tokens") or []
        for var, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            tid = md.get("tokenizer.ggml." + key)
            if isinstance(tid, int) and 0 <= tid < len(texts):
                tokens[var] = texts[tid]

    if template_name is not None:
        template = named.get(template_name)
        if not isinstance(template, str):
            have = ", ".join(sorted(named)) or "none"
            raise UsageError(
                f"model {name} has no chat template named {template_name!r} "
                f"(tokenizer.chat_template.{template_name}); named templates: {have}"
            )
        return template, name, tokens
    if not isinstance(default, str) or not default.strip():
        raise UnsupportedError(
            f"model {name} has no chat template (tokenizer.chat_template); use plain prompts "
            "with `kiln run`, or pass a template"
        )
    return default, name, tokens


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """A list of {"role": str, "content": str} dicts (other keys are passed through; content may
    be None on an assistant message with tool_calls)."""
    if not isinstance(messages, (list, tuple)):
        raise UsageError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, not "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise UsageError("messages is empty: give at least one {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}"
            )
        role = m.get("role")
        if not isinstance(role, str) or not role:
            got = "missing" if "role" not in m else f"{type(role).__name__} {role!r}"
            raise UsageError(f"messages[{i}]: 'role' must be a non-empty str ({got})")
        if "content" not in m:
            raise UsageError(f"messages[{i}] (role {role!r}) has no 'content'")
        content = m["content"]
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise UsageError(
                f"messages[{i}] (role {role!r}): 'content' must be a str, not "
                f"{type(content).__name__}"
            )
        out.append(dict(m))
    return out


def render_chat(
    template_or_tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    template_name: str | None = None,
    **kwargs: Any,
) -> str:
    """Render a chat template.

    template_or_tokenizer: the template text, a Tokenizer, a GGUFModel or a metadata dict.
    messages: [{"role": "system"|"user"|"assistant"|..., "content": str}, ...].
    add_generation_prompt: end with the header of an assistant turn.
    template_name: use tokenizer.chat_template.<name> (e.g. "tool_use") instead of the default.
    kwargs: extra template variables (tools=[...], bos_token=..., enable_thinking=False, ...).
    """
    source, name, variables = _template_and_tokens(template_or_tokenizer, template_name)
    msgs = validate_messages(messages)
    try:
        template = compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template of {name} is not valid Jinja (line {e.lineno}: {e.message})"
        ) from None
    context: dict[str, Any] = {"tools": None, "documents": None, **variables, **kwargs}
    context["messages"] = msgs
    context["add_generation_prompt"] = add_generation_prompt
    try:
        return template.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(
            f"the chat template of {name} failed: {e.message or type(e).__name__}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a template can raise anything Python can
        raise ChatTemplateError(
            f"the chat template of {name} failed: {type(e).__name__}: {e}"
        ) from None

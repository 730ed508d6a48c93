"""Chat templates (tokenizer.chat_template), rendered the way Hugging Face transformers does.

Same Jinja environment as transformers' chat_template_utils: ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; `raise_exception(msg)` and
`strftime_now(fmt)` as globals; `tojson` replaced by json.dumps without HTML escaping (ensure_ascii
False, with indent/separators/sort_keys); the `{% generation %}` block accepted (it only marks
assistant text for training masks there). Variables: messages, add_generation_prompt, tools,
documents, bos_token, eos_token, plus any extra keyword the caller passes.

Roles are system, user, assistant and tool. What a message says is text: render_chat_protected
(used by Tokenizer.encode_chat) hands the template each control-token text found in the
messages, tools and documents as a private-use character, so that only the template's own markup
becomes special tokens (llama.cpp's llama-server parses special tokens in the whole rendered
prompt, so there a user message can forge a system turn; Kiln is stricter by design).

A template is the model's (tokenizer.chat_template), one of its named templates
(tokenizer.chat_template.<name>), a built-in well-known one (BUILTIN_TEMPLATES: chatml, llama3),
a file, or a template text: resolve_chat_template picks it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension

from kiln.errors import KilnError, UnsupportedError, UsageError
from kiln.fileio import read_input_text
from kiln.tokenizer.render_limits import LimitedEnvironment, TemplateLimitError, render_bounded


class ChatTemplateError(KilnError):
    """A chat template that does not parse, or that refused the messages while rendering."""


ROLES = ("system", "user", "assistant", "tool")

# Well-known templates by name, each with the special tokens its markup writes (a vocabulary
# without them cannot use it). Kept to the two formats most GGUF chat models speak; a model's own
# template, or a file, covers the rest.
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
        " + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    # Meta Llama 3 Instruct's template
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}
MAX_TEMPLATE_FILE = 1 << 20  # bytes; the largest real templates are ~20 KB


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
    env = LimitedEnvironment(  # the sandbox, with size limits (render_limits)
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _template_and_tokens(
    template_or_tokenizer: Any, template_name: str | None, chat_template: str | None = None
) -> tuple[str, str, dict[str, str]]:
    """(template text, model name for messages, default special-token variables).
    chat_template: a template text used instead of the model's (its tokens still apply)."""
    from kiln.tokenizer.vocab import Tokenizer

    if isinstance(template_or_tokenizer, str):
        if template_name is not None or chat_template is not None:
            raise UsageError(
                "template_name and chat_template apply to a model or tokenizer, not a template text"
            )
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

    if chat_template is not None:
        if template_name is not None:
            raise UsageError("give chat_template or template_name, not both")
        if not isinstance(chat_template, str):
            raise UsageError(f"chat_template must be a str, not {type(chat_template).__name__}")
        return chat_template, name, tokens
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
    """A list of {"role": one of ROLES, "content": str} dicts (other keys are passed through;
    content may be None on an assistant message with tool_calls)."""
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
        if role not in ROLES:
            raise UsageError(
                f"messages[{i}]: 'role' must be one of {', '.join(ROLES)}, not {role!r}"
            )
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
    chat_template: str | None = None,
    **kwargs: Any,
) -> str:
    """Render a chat template.

    template_or_tokenizer: the template text, a Tokenizer, a GGUFModel or a metadata dict.
    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...].
    add_generation_prompt: end with the header of an assistant turn.
    template_name: use tokenizer.chat_template.<name> (e.g. "tool_use") instead of the default.
    chat_template: a template text to use instead of the model's (see resolve_chat_template).
    kwargs: extra template variables (tools=[...], bos_token=..., enable_thinking=False, ...).
    """
    source, name, variables = _template_and_tokens(
        template_or_tokenizer, template_name, chat_template
    )
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
        return render_bounded(template, context)  # step, time and size limits
    except TemplateLimitError as e:
        raise ChatTemplateError(f"the chat template of {name} was stopped: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(
            f"the chat template of {name} failed: {e.message or type(e).__name__}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a template can raise anything Python can
        raise ChatTemplateError(
            f"the chat template of {name} failed: {type(e).__name__}: {e}"
        ) from None


def resolve_chat_template(value: Any, tokenizer: Any = None) -> str:
    """The template text `value` stands for: a template text (it holds "{{" or "{%"), a name of
    the model's templates (tokenizer.chat_template.<name>), a built-in name (BUILTIN_TEMPLATES),
    or the path of a file holding one (a path given as os.PathLike is always a file; a file
    named like a template name is read as ./NAME)."""
    named = dict(getattr(tokenizer, "chat_templates", None) or {})
    if isinstance(value, os.PathLike):
        return _read_template_file(Path(value), named)
    if not isinstance(value, str):
        raise UsageError(
            f"chat_template must be a template text, a template name or a file path, not "
            f"{type(value).__name__}"
        )
    if "{{" in value or "{%" in value:
        return value
    if value in named:
        return named[value]
    if value in BUILTIN_TEMPLATES:
        source, markup = BUILTIN_TEMPLATES[value]
        token_id = getattr(tokenizer, "token_id", None)
        if token_id is not None:
            missing = [t for t in markup if token_id(t) is None]
            if missing:
                raise UsageError(
                    f"the built-in chat template {value!r} writes {', '.join(missing)}, which "
                    f"the vocabulary of {tokenizer.name} does not have: its turns would be plain "
                    "text to the model; use the model's own template or a template file"
                )
        return source
    return _read_template_file(Path(value), named)


def _template_names(named: Mapping[str, str]) -> str:
    own = ", ".join(sorted(named)) or "none"
    return f"this model's: {own}; built-in: {', '.join(BUILTIN_TEMPLATES)}"


def _read_template_file(path: Path, named: Mapping[str, str]) -> str:
    if not path.exists():
        raise UsageError(
            f"chat template {str(path)!r}: no such file, and not a template name "
            f"({_template_names(named)})"
        )
    return read_input_text(path, "chat template", MAX_TEMPLATE_FILE)


# Markers for protected texts: Supplementary Private Use Area-A, one character each, so that no
# template operation on the text (trim, split, slicing, upper) can cut or change one.
_MARK_FIRST, _MARK_LAST = 0xF0000, 0xFFFFD


def render_chat_protected(
    template_or_tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    protect: Iterable[str],
    template_name: str | None = None,
    chat_template: str | None = None,
    **kwargs: Any,
) -> tuple[str, dict[str, str]]:
    """render_chat with every occurrence of a `protect` text (longest first) inside the
    messages' fields (all but the role), the tools and the documents replaced by a private-use
    character that appears nowhere else. -> (rendered text, {character: the text it stands
    for}); a tokenizer cuts the special tokens out of the rendered text, then puts the texts back
    as plain text (Tokenizer.encode_chat). Without a protected text in the input, the rendered
    text is render_chat's."""
    msgs = validate_messages(messages)
    source = _template_and_tokens(template_or_tokenizer, template_name, chat_template)[0]
    data = [msgs, kwargs.get("tools"), kwargs.get("documents")]
    texts = sorted({t for t in protect if t}, key=len, reverse=True)
    firsts = frozenset(t[0] for t in texts)
    candidates = [s for s in _strings(data) if not firsts.isdisjoint(s)]
    found = [t for t in texts if any(t in s for s in candidates)]
    if not found:
        return (
            render_chat(
                template_or_tokenizer,
                msgs,
                add_generation_prompt,
                template_name=template_name,
                chat_template=chat_template,
                **kwargs,
            ),
            {},
        )
    seen = "".join(_strings([data, kwargs, source]))
    free = (chr(c) for c in range(_MARK_FIRST, _MARK_LAST + 1) if chr(c) not in seen)
    marks = {t: next(free) for t in found}
    defused = [{k: (v if k == "role" else _defuse(v, marks)) for k, v in m.items()} for m in msgs]
    for key in ("tools", "documents"):
        if kwargs.get(key) is not None:
            kwargs[key] = _defuse(kwargs[key], marks)
    text = render_chat(
        template_or_tokenizer,
        defused,
        add_generation_prompt,
        template_name=template_name,
        chat_template=chat_template,
        **kwargs,
    )
    return text, {c: t for t, c in marks.items()}


def _strings(x: Any) -> Iterable[str]:
    """Every str inside nested dicts, lists and tuples (keys too)."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, Mapping):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def _defuse(x: Any, marks: dict[str, str]) -> Any:
    """x with each marked text replaced by its character, longest text first (marks' order)."""
    if isinstance(x, str):
        for t, c in marks.items():
            if t in x:
                x = x.replace(t, c)
        return x
    if isinstance(x, Mapping):
        return {_defuse(k, marks): _defuse(v, marks) for k, v in x.items()}
    if isinstance(x, list):
        return [_defuse(v, marks) for v in x]
    if isinstance(x, tuple):
        return tuple(_defuse(v, marks) for v in x)
    return x

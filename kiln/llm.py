"""The Python API: kiln.LLM(model).generate / stream / chat / logits."""

from __future__ import annotations

import numbers
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from kiln.errors import UsageError
from kiln.runtime.generate import Completion, generate_batch, generate_stream
from kiln.runtime.sampler import SamplingParams

DEFAULT_CTX = 4096  # like llama.cpp's default -c; never more than the model was trained on


class LLM:
    """A GGUF model ready to generate.

    model: a GGUF path or a known name (e.g. "smollm2-135m", fetched on first use).
    device: "cpu", "cuda", "cuda:1" or "auto" (CUDA when available).
    n_ctx: context size in tokens (default min(4096, the model's trained context)).
    ubatch: prompt tokens processed per forward pass.
    backend: "auto" (the triton kernels on CUDA, the cpu backend on the CPU: weights kept
        quantized), "torch" (the float32 reference), "triton", "cpu".
    fusions: {fusion name: on} overrides (see `kiln fusions`; KILN_<NAME> env vars also apply).
    verbose: print a line on stderr when the model is loaded (which file, where, how long), as
        llama-cpp-python's verbose=True does by default; False for silence.
    threads: torch's intra-op threads (CPU work), set for the whole process; default: the
        physical cores this process may run on.
    n_seq: the most sequences decoded at once (a list of prompts given to generate() or chat()
        runs as batches of up to n_seq); the KV cache grows as they need it.
    cache_type_k, cache_type_v: the K and V cache types, as llama.cpp's -ctk / -ctv: "f32",
        "f16", "bf16", "q8_0", "q4_0" (blocks of 32 along the head: the head size must be a
        multiple of 32); default: f16 on the triton backend, f32 on the CPU backends.

    generate() and chat() take one prompt / conversation, or a list of them run as one batch
    (each with its own parameters: pass a list of SamplingParams), and return Completions in
    input order. A prompt may be text or a list of token ids. logprobs=N records each generated
    token's log-probability and the N most likely (Completion.logprobs).

    chat() keeps the KV cache of the conversation: a call whose messages extend the previous
    call's (its messages, the reply, then new ones) processes only the new tokens; reset()
    forgets it.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "smollm2-135m",
        device: str = "auto",
        n_ctx: int | None = None,
        ubatch: int = 512,
        backend: str = "auto",
        fusions: dict[str, bool] | None = None,
        verbose: bool = True,
        threads: int | None = None,
        n_seq: int = 8,
        cache_type_k: str | None = None,
        cache_type_v: str | None = None,
    ):
        from kiln.gguf import read_gguf
        from kiln.hub import resolve_model
        from kiln.models import build_model
        from kiln.ops.cpu import set_threads
        from kiln.quant.kv import cache_type
        from kiln.runtime.engine import Engine, PromptCache
        from kiln.tokenizer import Tokenizer

        _check_model_args(model, n_ctx, ubatch, backend, fusions)
        if isinstance(n_seq, bool) or not isinstance(n_seq, numbers.Integral) or n_seq < 1:
            raise UsageError(f"n_seq must be an integer >= 1, got {n_seq!r}")
        for name, value in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v)):
            if value is not None:  # a bad name fails before a model is fetched
                cache_type(value, f"{name} (-ct{name[-1]})")
        self.threads = set_threads(threads)
        self.device = pick_device(device)  # a bad device fails before a model is fetched
        self.path = resolve_model(model)
        start = time.perf_counter()
        self.gguf = read_gguf(self.path)
        self.config = self.gguf.config
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        # The BPE merges (a list of as many strings as the vocabulary) are read by the tokenizer
        # build alone: not kept for the process's life (about 2 MB of peak RSS for the demo).
        self.gguf.metadata.pop("tokenizer.ggml.merges", None)
        n_ctx = n_ctx if n_ctx is not None else min(DEFAULT_CTX, self.config.n_ctx_train)
        if n_ctx > self.config.n_ctx_train:
            raise UsageError(
                f"n_ctx {n_ctx} exceeds the {self.config.n_ctx_train} tokens "
                f"{self.path.name} was trained on"
            )
        self.model = build_model(self.gguf, self.device, backend=backend, fusions=fusions)
        self.engine = Engine(
            self.model,
            n_ctx=n_ctx,
            ubatch=ubatch,
            n_seq=int(n_seq),
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
        )
        self.prompt_cache = PromptCache(self.engine)  # the conversation of chat()
        if verbose:
            size = self.path.stat().st_size / 1e6
            print(
                f"kiln: loaded {self.path.name} ({size:.0f} MB, {self.config.n_layer} layers) on "
                f"{self.device} ({self.model.ops.name}) in {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
            )

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    # -- text in, text out -------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        logprobs: int | None = None,
        **options: Any,
    ) -> Completion | list[Completion]:
        """The continuation of a prompt (text or token ids), or of each prompt of a list, run as
        one batch (params: one SamplingParams for all, or one per prompt; options apply to
        all) -> a Completion, or a list of them in input order."""
        n = _check_logprobs(logprobs)
        if _is_batch(prompt):
            fitted = [self.prompt_ids(p, dict(options)) for p in prompt]
            return self._batch(fitted, params, options, n)
        ids = self.prompt_ids(prompt, options)
        result = Completion()
        for _ in self._stream(ids, params, options, result, logprobs=n):
            pass
        return result

    def stream(
        self, prompt: str, params: SamplingParams | None = None, **options: Any
    ) -> Iterator[str]:
        """Text pieces as they are generated."""
        yield from self._stream(self.prompt_ids(prompt, options), params, options, Completion())

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        stream: bool = False,
        *,
        logprobs: int | None = None,
        chat_template: str | os.PathLike[str] | None = None,
        tools: list[Any] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Completion | Iterator[str]:
        """The assistant's reply to a conversation.

        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], rendered
            with the chat template; what they say stays text (a "<|im_end|>" in a message is
            never the control token).
        chat_template: the model's template unless given: a template text, a name of the
            model's (tokenizer.chat_template.NAME) or a built-in one ("chatml", "llama3"), or a
            file (see kiln.tokenizer.chat_template.resolve_chat_template).
        tools: the template's `tools` variable (function definitions, as for transformers).
        template_kwargs: other template variables, e.g. {"enable_thinking": False} (Qwen3), as
            llama-server's chat_template_kwargs.
        options: sampling options (temperature=, max_tokens=, seed=, ...; see SamplingParams)
            and truncate=True.
        The KV cache of the conversation is kept: the next call with these messages, the reply
        and a new message processes only the new tokens.
        A list of conversations runs as one batch (no stream, no kept cache) -> a list of
        Completions in input order.
        """
        n = _check_logprobs(logprobs)
        if _is_conversations(messages):
            if stream:
                raise UsageError("stream=True takes one conversation, not a list of them")
            fitted = [
                self.encode_chat(
                    m,
                    dict(options),
                    chat_template=chat_template,
                    tools=tools,
                    template_kwargs=template_kwargs,
                )
                for m in messages
            ]
            return self._batch(fitted, params, options, n)
        ids = self.encode_chat(
            messages,
            options,
            chat_template=chat_template,
            tools=tools,
            template_kwargs=template_kwargs,
        )
        if stream:
            return self._stream(ids, params, options, Completion(), self.prompt_cache, n)
        result = Completion()
        for _ in self._stream(ids, params, options, result, self.prompt_cache, n):
            pass
        return result

    def reset(self) -> None:
        """Forget the conversation chat() kept (its KV cache)."""
        self.prompt_cache.clear()

    # -- tokens ------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 [len(token_ids), n_vocab]: one forward pass over a fresh cache."""
        ids = self._token_ids(token_ids)
        seq = self.engine.new_sequence()
        try:
            return self.engine.prefill(ids, seq, all_logits=True)
        finally:
            seq.free()

    def prompt_ids(self, prompt, options: dict[str, Any]) -> list[int]:
        """A prompt's ids, fitted to the context (options: truncate=): text is encoded, token ids
        (a list of ints, a 1-D tensor or array) are checked."""
        if isinstance(prompt, str):
            return self.encode_prompt(prompt, options)
        if isinstance(prompt, (bytes, bytearray)) or not (
            isinstance(prompt, Sequence) or hasattr(prompt, "tolist")
        ):
            raise UsageError(
                f"the prompt must be a string, a list of token ids or a list of prompts, got "
                f"{type(prompt).__name__}"
            )
        return self._fit(self._token_ids(prompt), options)

    def encode_prompt(self, prompt: str, options: dict[str, Any] | None = None) -> list[int]:
        if not isinstance(prompt, str):
            raise UsageError(f"the prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, add_special=True)
        if not ids:  # "" on a model that adds BOS starts from BOS, as llama.cpp does
            raise UsageError(
                f"the prompt is empty and {self.path.name} adds no BOS token to start from: "
                f"give some text to continue"
            )
        return self._fit(ids, options)

    def _token_ids(self, token_ids: Sequence[int]) -> list[int]:
        """A list of ints in the vocabulary (a 1-D integer tensor or array too), checked."""
        if hasattr(token_ids, "tolist") and not isinstance(token_ids, (list, tuple)):
            token_ids = token_ids.tolist()  # torch / numpy: elements become Python numbers
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise UsageError(
                f"token_ids must be a list of token ids (ints), got {type(token_ids).__name__}; "
                f"turn text into ids with llm.tokenizer.encode(text)"
            )
        n_vocab = self.config.n_vocab
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise UsageError(f"token_ids[{i}] must be an int, got {t!r}")
            if not 0 <= t < n_vocab:
                raise UsageError(
                    f"token_ids[{i}] = {t} is outside the vocabulary (0..{n_vocab - 1})"
                )
        return [int(t) for t in token_ids]

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        options: dict[str, Any] | None = None,
        *,
        chat_template: str | os.PathLike[str] | None = None,
        tools: list[Any] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt ids of a conversation (see chat()); options: {"truncate": bool}."""
        from kiln.tokenizer.chat_template import resolve_chat_template

        check_messages(messages)
        variables = check_template_kwargs(template_kwargs)
        if tools is not None:
            if not isinstance(tools, (list, tuple)):
                raise UsageError(f"tools must be a list, not {type(tools).__name__}")
            variables["tools"] = list(tools)
        if chat_template is not None:
            variables["chat_template"] = resolve_chat_template(chat_template, self.tokenizer)
        return self._fit(self.tokenizer.encode_chat(messages, **variables), options)

    def _fit(self, ids: list[int], options: dict[str, Any] | None) -> list[int]:
        """Enforce the context limit on a prompt; with truncate=True keep its end instead."""
        options = options if options is not None else {}
        truncate = options.pop("truncate", False)
        if not isinstance(truncate, bool):
            raise UsageError(f"truncate must be True or False, got {truncate!r}")
        if len(ids) < self.n_ctx:
            return ids
        if not truncate:
            raise UsageError(
                f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} (one more "
                f"is needed to generate): shorten it, raise n_ctx (--ctx-size, at most "
                f"{self.config.n_ctx_train}), or pass truncate=True (--truncate) to keep its end"
            )
        keep = max(1, self.n_ctx // 2)
        return ids[-keep:]

    def _stream(
        self, ids, params, options, result: Completion, prompt_cache=None, logprobs=None
    ) -> Iterator[str]:
        params = _params(params, options)
        return generate_stream(
            self.engine, self.tokenizer, ids, params, result, prompt_cache, logprobs
        )

    def _batch(self, prompts: list[list[int]], params, options, logprobs) -> list[Completion]:
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise UsageError(
                    f"{len(params)} SamplingParams for {len(prompts)} prompts: give one for "
                    f"all or one per prompt"
                )
            each = [_params(p, options) for p in params]
        else:
            each = [_params(params, options)] * len(prompts)
        return generate_batch(self.engine, self.tokenizer, prompts, each, logprobs)


def _params(params, options: dict[str, Any]) -> SamplingParams:
    if params is not None and not isinstance(params, SamplingParams):
        raise UsageError(f"params must be a SamplingParams, got {type(params).__name__}")
    params = params or SamplingParams()
    return params.replace(**options) if options else params


def _check_logprobs(logprobs) -> int | None:
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral):
        raise UsageError(
            f"logprobs must be an integer >= 0 (the top-n to record), got {logprobs!r}"
        )
    if not 0 <= logprobs <= 20:
        raise UsageError(f"logprobs must be in 0..20 (as OpenAI's top_logprobs), got {logprobs}")
    return int(logprobs)


def _is_batch(prompt) -> bool:
    """A list of prompts (texts or id lists), not one prompt of token ids."""
    if isinstance(prompt, (list, tuple)) and prompt:
        return all(isinstance(p, str) or _is_id_list(p) for p in prompt) and not _is_id_list(prompt)
    return False


def _is_id_list(x) -> bool:
    return isinstance(x, (list, tuple)) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x
    )


def _is_conversations(messages) -> bool:
    return (
        isinstance(messages, (list, tuple))
        and bool(messages)
        and all(isinstance(m, (list, tuple)) for m in messages)
    )


# Template variables that have their own argument (or are the template's input)
_RESERVED_TEMPLATE_VARIABLES = (
    "messages",
    "add_generation_prompt",
    "tools",
    "chat_template",
    "template_name",
    "protect",
)


def check_template_kwargs(template_kwargs: Any) -> dict[str, Any]:
    """A copy of template_kwargs ({name: value} template variables), checked."""
    if template_kwargs is None:
        return {}
    if not isinstance(template_kwargs, dict):
        raise UsageError(
            f"template_kwargs must be a dict of template variables such as "
            f"{{'enable_thinking': False}}, not {type(template_kwargs).__name__}"
        )
    for key in template_kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise UsageError(f"template_kwargs: {key!r} is not a variable name")
        if key in _RESERVED_TEMPLATE_VARIABLES:
            raise UsageError(
                f"template_kwargs: {key!r} has its own argument"
                + (" (tools=, chat_template=)" if key in ("tools", "chat_template") else "")
            )
    return dict(template_kwargs)


def pick_device(device: str | torch.device) -> torch.device:
    """ "auto" (CUDA when available), "cpu", "cuda" or "cuda:N", checked: another kind of device
    (meta, mps, xla, ...) or a GPU this machine does not have is a UsageError."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise UsageError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(
            f"device {device!r}: Kiln runs on the CPU or on NVIDIA GPUs through CUDA; "
            f"use cpu, cuda, cuda:N or auto"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {device} was asked for but this machine has no CUDA GPU; use cpu"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(
                f"device {device}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}"
            )
    return dev


def _check_model_args(model, n_ctx, ubatch, backend, fusions) -> None:
    """The types of LLM(...)'s arguments; their values are checked where they are used."""
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(
            f"model must be a GGUF path or a known model name, got {type(model).__name__}"
        )
    for name, value in (("n_ctx", n_ctx), ("ubatch", ubatch)):
        if value is None and name == "n_ctx":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(backend, str):
        raise UsageError(f"backend must be 'auto', 'torch', 'triton' or 'cpu', got {backend!r}")
    if fusions is not None and (
        not isinstance(fusions, Mapping)
        or not all(isinstance(k, str) and isinstance(v, bool) for k, v in fusions.items())
    ):
        raise UsageError(f"fusions must be a dict of fusion name -> bool, got {fusions!r}")


def check_messages(messages: Any) -> None:
    """A list of dicts whose content is a str (an assistant turn that carries tool_calls may
    have None). Roles are checked where the conversation is rendered."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise UsageError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise UsageError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UsageError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise UsageError(
                f"messages[{i}]['content'] must be a str, got {type(content).__name__}"
            )

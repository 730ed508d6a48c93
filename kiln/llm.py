"""The Python API: kiln.LLM(model).generate / stream / chat / logits."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kiln.errors import UsageError
from kiln.runtime.generate import Completion, generate_stream
from kiln.runtime.sampler import SamplingParams

DEFAULT_CTX = 4096  # like llama.cpp's default -c; never more than the model was trained on


class LLM:
    """A GGUF model ready to generate.

    model: a GGUF path or a known name (e.g. "smollm2-135m", fetched on first use).
    device: "cpu", "cuda", "cuda:1" or "auto" (CUDA when available).
    n_ctx: context size in tokens (default min(4096, the model's trained context)).
    ubatch: prompt tokens processed per forward pass.
    backend: "auto" (the triton kernels on CUDA, the torch reference elsewhere), "torch", "triton".
    fusions: {fusion name: on} overrides (see `kiln fusions`; KILN_<NAME> env vars also apply).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "smollm2-135m",
        device: str = "auto",
        n_ctx: int | None = None,
        ubatch: int = 512,
        backend: str = "auto",
        fusions: dict[str, bool] | None = None,
    ):
        from kiln.gguf import read_gguf
        from kiln.hub import resolve_model
        from kiln.models import build_model
        from kiln.runtime.engine import Engine
        from kiln.tokenizer import Tokenizer

        self.path = resolve_model(model)
        self.gguf = read_gguf(self.path)
        self.config = self.gguf.config
        self.device = pick_device(device)
        self.tokenizer = Tokenizer.from_gguf(self.gguf)
        n_ctx = n_ctx if n_ctx is not None else min(DEFAULT_CTX, self.config.n_ctx_train)
        if n_ctx > self.config.n_ctx_train:
            raise UsageError(
                f"n_ctx {n_ctx} exceeds the {self.config.n_ctx_train} tokens "
                f"{self.path.name} was trained on"
            )
        self.model = build_model(self.gguf, self.device, backend=backend, fusions=fusions)
        self.engine = Engine(self.model, n_ctx=n_ctx, ubatch=ubatch)

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    # -- text in, text out -------------------------------------------------------------------
    def generate(
        self, prompt: str, params: SamplingParams | None = None, **options: Any
    ) -> Completion:
        result = Completion()
        for _ in self._stream(self.encode_prompt(prompt, options), params, options, result):
            pass
        return result

    def stream(
        self, prompt: str, params: SamplingParams | None = None, **options: Any
    ) -> Iterator[str]:
        """Text pieces as they are generated."""
        yield from self._stream(self.encode_prompt(prompt, options), params, options, Completion())

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        params: SamplingParams | None = None,
        stream: bool = False,
        **options: Any,
    ) -> Completion | Iterator[str]:
        """messages: [{"role": "user", "content": "..."}, ...], rendered with the template."""
        ids = self.encode_chat(messages, options)
        if stream:
            return self._stream(ids, params, options, Completion())
        result = Completion()
        for _ in self._stream(ids, params, options, result):
            pass
        return result

    # -- tokens ------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 [len(token_ids), n_vocab]: one forward pass over a fresh cache."""
        ids = [int(t) for t in token_ids]
        cache = self.engine.new_cache()
        return self.engine.prefill(ids, cache, all_logits=True)

    def encode_prompt(self, prompt: str, options: dict[str, Any] | None = None) -> list[int]:
        if not isinstance(prompt, str):
            raise UsageError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise UsageError("the prompt is empty: give some text to continue")
        return self._fit(self.tokenizer.encode(prompt, add_special=True), options)

    def encode_chat(
        self, messages: Sequence[dict[str, str]], options: dict[str, Any] | None = None
    ) -> list[int]:
        return self._fit(self.tokenizer.encode_chat(list(messages)), options)

    def _fit(self, ids: list[int], options: dict[str, Any] | None) -> list[int]:
        """Enforce the context limit on a prompt; with truncate=True keep its end instead."""
        options = options if options is not None else {}
        truncate = options.pop("truncate", False)
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

    def _stream(self, ids, params, options, result: Completion) -> Iterator[str]:
        params = (params or SamplingParams()).replace(**options) if options else params
        params = params or SamplingParams()
        return generate_stream(self.engine, self.tokenizer, ids, params, result)


def pick_device(device: str) -> torch.device:
    """ "auto" (CUDA when available), "cpu", "cuda" or "cuda:N", checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but this machine has no CUDA GPU; use cpu")
    return dev

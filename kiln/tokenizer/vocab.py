"""Tokenizer: the vocabulary of a GGUF (tokenizer.ggml.*) and llama.cpp's rules around it.

What follows llama.cpp's src/llama-vocab.cpp (llama_vocab::impl::load, tokenize, token_to_piece,
detokenize), so that the same text gives the same ids as llama.cpp:
- token types become attributes (normal, unknown, control, user-defined, unused, byte), and
  tokens whose text marks them as control or end-of-generation (<|im_end|>, <|eot_id|>,
  <|endoftext|>, FIM tokens, ...) get the control attribute even when the file says normal;
- the end-of-generation set is eos, eot, eom, the FIM pad/repo/file-separator tokens and every
  token with one of llama.cpp's end-of-turn texts;
- special tokens are cut out of the text before the model's tokenizer runs, longest text first;
  user-defined tokens always, control and unknown tokens only with parse_special=True;
- BOS is added when tokenizer.ggml.add_bos_token says so, defaulting per tokenizer type (SPM:
  yes; BPE: only the llama3-style pre-tokenizers), EOS when tokenizer.ggml.add_eos_token says so.

Checked against llama.cpp's libllama (the peer build) on the four ggml-vocab files, stories260K
and SmolLM2: same ids on thousands of random texts, same attributes, pieces and EOG sets.

Where Kiln departs on purpose:
- decode strips the space that add_space_prefix put before the first word from the first token
  that is rendered (llama.cpp: from the first token even when it is a skipped BOS), so that
  decode(encode(text)) == text, as with Hugging Face's decoders;
- clean-up of spaces before punctuation (llama.cpp's clean_spaces) is off unless asked for;
- a BPE vocabulary without bos/eos ids has none (llama.cpp defaults both to id 11);
- the per-model LSTRIP/RSTRIP attributes llama.cpp sets by model name (phi-3, jina) are not set;
- eot_id, when the file does not name it, is the first of llama.cpp's end-of-turn texts in list
  order (llama.cpp takes whichever its hash map yields first); the EOG set is the same.
"""

from __future__ import annotations

import itertools
import operator
import os
from collections.abc import Iterable, Mapping
from enum import IntFlag
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError, UnsupportedError, UsageError
from kiln.tokenizer.bpe import BPEEncoder, byte_decode, pre_tokenizer_for
from kiln.tokenizer.spm import SPMEncoder


class TokenAttr(IntFlag):
    """llama.h's llama_token_attr."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# GGUF tokenizer.ggml.token_type values (gguf.TokenType) -> attributes
_TYPE_TO_ATTR = {
    0: int(TokenAttr.UNDEFINED),
    1: int(TokenAttr.NORMAL),
    2: int(TokenAttr.UNKNOWN),
    3: int(TokenAttr.CONTROL),
    4: int(TokenAttr.USER_DEFINED),
    5: int(TokenAttr.UNUSED),
    6: int(TokenAttr.BYTE),
}
_CONTROL = int(TokenAttr.CONTROL)
_UNKNOWN = int(TokenAttr.UNKNOWN)
_USER = int(TokenAttr.USER_DEFINED)
_NORMAL = int(TokenAttr.NORMAL)
_BYTE = int(TokenAttr.BYTE)
_UNUSED = int(TokenAttr.UNUSED)
_HIDDEN = _CONTROL | _UNKNOWN  # rendered only when special tokens are not skipped

SUPPORTED_MODELS = ("llama", "gpt2")

# Texts llama.cpp recognises when the GGUF does not name the token (llama_vocab::impl::load).
_EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "fim_suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "fim_mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
)

_ID_KEYS = {
    "bos": ("bos_token_id",),
    "eos": ("eos_token_id",),
    "eot": ("eot_token_id",),
    "eom": ("eom_token_id",),
    "unk": ("unknown_token_id",),
    "sep": ("seperator_token_id",),  # sic, as gguf spells it
    "pad": ("padding_token_id",),
    "mask": ("mask_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"),
    "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"),
    "fim_pad": ("fim_pad_token_id",),
    "fim_rep": ("fim_rep_token_id",),
    "fim_sep": ("fim_sep_token_id",),
}


class Tokenizer:
    """Text <-> token ids for a GGUF model, matching llama.cpp.

    Build it once per model (`Tokenizer.from_gguf(model)`); encode/decode are then cheap.
    """

    def __init__(self, metadata: Mapping[str, Any], *, source: str = "<model>") -> None:
        self.source = source
        md = metadata
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise UnsupportedError(
                f"{source} has no tokenizer (no tokenizer.ggml.model in its metadata); "
                "pass token ids instead of text, or use a GGUF converted with its vocabulary"
            )
        if model in ("none", "no_vocab"):
            raise UnsupportedError(
                f"{source} has no tokenizer (tokenizer.ggml.model = {model!r}); pass token ids "
                "instead of text"
            )
        if model not in SUPPORTED_MODELS:
            raise UnsupportedError(
                f"{source}: tokenizer type {model!r} (tokenizer.ggml.model) is not supported by "
                f"Kiln; supported: {', '.join(SUPPORTED_MODELS)} (SentencePiece and byte-level "
                "BPE)"
            )
        self.model_type: str = model
        self.pre: str | None = md.get("tokenizer.ggml.pre")

        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(
                f"{source} has no tokenizer vocabulary: tokenizer.ggml.model is {model!r} but "
                "tokenizer.ggml.tokens is missing"
            )
        try:
            if not isinstance(tokens, list):
                raise TypeError
            "".join(tokens)  # checks that every entry is a str, at C speed
        except TypeError:
            raise ConfigError(f"{source}: tokenizer.ggml.tokens is not a list of strings") from None
        n = len(tokens)
        if n == 0:
            raise ConfigError(f"{source}: tokenizer.ggml.tokens is empty")
        if "" in tokens:  # llama.cpp renames empty tokens so that they stay distinct
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._texts: list[str] = tokens
        self._token_to_id: dict[str, int] = dict(zip(tokens, range(n)))
        if len(self._token_to_id) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise ConfigError(
                        f"{source}: duplicate token in the vocabulary: {t!r} has ids {seen[t]} "
                        f"and {i}"
                    )
                seen[t] = i

        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = [_NORMAL] * n
        else:
            if not isinstance(types, list) or len(types) < n:
                raise ConfigError(
                    f"{source}: tokenizer.ggml.token_type has "
                    f"{len(types) if isinstance(types, list) else 'no'} entries for {n} tokens"
                )
            attrs = list(map(_TYPE_TO_ATTR.get, types[:n], itertools.repeat(0, n)))
        self._attrs: list[int] = attrs

        # Flags, defaulting per tokenizer type as llama.cpp does
        is_spm = model == "llama"
        if is_spm:
            spec = None
            add_bos, add_space_prefix, clean_spaces = True, True, False
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
        else:
            spec = pre_tokenizer_for(self.pre, source)
            add_bos, add_space_prefix, clean_spaces = spec.add_bos, False, spec.clean_spaces
            ids = {}
        add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        self.add_space_prefix: bool = add_space_prefix
        self.clean_spaces: bool = clean_spaces

        for name, keys in _ID_KEYS.items():
            default = ids.get(name)
            if default is not None and default >= n:
                default = None
            value = default
            for key in keys:  # a deprecated key (prefix_token_id, ...) wins, as in llama.cpp
                v = md.get("tokenizer.ggml." + key)
                # out of range (e.g. 0xFFFFFFFF for "none"): llama.cpp keeps the default
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
                    value = v
            ids[name] = value
        if spec is not None and spec.no_bos and md.get("tokenizer.ggml.bos_token_id") is None:
            ids["bos"] = None

        self.add_bos: bool = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos: bool = bool(md.get("tokenizer.ggml.add_eos_token", False))
        if self.add_bos and ids["bos"] is None:
            raise ConfigError(
                f"{source}: tokenizer.ggml.add_bos_token is true, but "
                "tokenizer.ggml.bos_token_id is not set"
            )
        if self.add_eos and ids["eos"] is None:
            raise ConfigError(
                f"{source}: tokenizer.ggml.add_eos_token is true, but "
                "tokenizer.ggml.eos_token_id is not set"
            )

        self._detect_special(ids)
        self._ids = ids

        # Special tokens cut out of the text before tokenizing, longest text first
        special = _indices(attrs, _CONTROL | _USER | _UNKNOWN)
        special.sort(key=lambda i: -len(tokens[i]))
        self._special_parse: tuple[int, ...] = tuple(special)
        self._special_always: tuple[int, ...] = tuple(
            i for i in special if not attrs[i] & (_CONTROL | _UNKNOWN)
        )
        self._control: tuple[str, ...] | None = None  # _control_texts(), made on first use

        self._pieces: list[bytes | None] = [None] * n
        if is_spm:
            scores = md.get("tokenizer.ggml.scores")
            if scores is None:
                scores = [0.0] * n
            elif not isinstance(scores, list) or len(scores) < n:
                raise ConfigError(
                    f"{source}: tokenizer.ggml.scores has fewer entries than the {n} tokens"
                )
            self._spm: SPMEncoder | None = SPMEncoder(
                self._token_to_id, [float(s) for s in scores[:n]], ids["unk"], source
            )
            self._bpe: BPEEncoder | None = None
        else:
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise ConfigError(
                    f"{source}: BPE tokenizer without merges (tokenizer.ggml.merges is missing)"
                )
            if not isinstance(merges, list):
                raise ConfigError(f"{source}: tokenizer.ggml.merges is not a list of strings")
            self._spm = None
            self._bpe = BPEEncoder(self._token_to_id, merges, spec, source)  # type: ignore[arg-type]

        self.chat_template: str | None = md.get("tokenizer.chat_template")
        self.chat_templates: dict[str, str] = {
            k[len("tokenizer.chat_template.") :]: v
            for k, v in md.items()
            if k.startswith("tokenizer.chat_template.") and isinstance(v, str)
        }
        self.name: str = md.get("general.name") or source

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, model: Any) -> Tokenizer:
        """From a GGUFModel, a metadata mapping, or a path to a .gguf file."""
        if isinstance(model, (str, os.PathLike)):
            from kiln.gguf.reader import read_gguf

            model = read_gguf(Path(model))
        if isinstance(model, Mapping):
            return cls(model, source=str(model.get("general.name") or "<metadata>"))
        metadata = getattr(model, "metadata", None)
        if not isinstance(metadata, Mapping):
            raise UsageError(
                f"Tokenizer.from_gguf takes a GGUFModel, a metadata dict or a path, not "
                f"{type(model).__name__}"
            )
        return cls(metadata, source=getattr(model, "source", None) or "<model>")

    def _detect_special(self, ids: dict[str, int | None]) -> None:
        """Auto-detection by token text, as llama.cpp does for files that do not name them."""
        attrs = self._attrs
        lookup = self._token_to_id.get

        def mark(tid: int) -> None:
            attrs[tid] |= _CONTROL

        if ids.get("eot") is None:
            for text in _EOT_TEXTS:
                tid = lookup(text)
                if tid is not None:
                    ids["eot"] = tid
                    mark(tid)
                    break
        if ids.get("eom") is None:
            for text in _EOM_TEXTS:
                tid = lookup(text)
                if tid is not None:
                    ids["eom"] = tid
                    mark(tid)
                    break
        for name, texts in _FIM_TEXTS.items():
            if ids.get(name) is None:
                for text in texts:
                    tid = lookup(text)
                    if tid is not None:
                        ids[name] = tid
                        mark(tid)
                        break

        for i in _indices(attrs, _CONTROL):  # control tokens named "unused" are unused
            if "unused" in self._texts[i]:
                attrs[i] |= _UNUSED

        eog: set[int] = set()
        for name in ("fim_pad", "fim_rep", "fim_sep"):
            if ids.get(name) is not None:
                eog.add(ids[name])  # type: ignore[arg-type]
        for text in _EOG_TEXTS:
            tid = lookup(text)
            if tid is not None:
                eog.add(tid)
                mark(tid)
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            tid = lookup(text)
            if tid is not None:
                attrs[tid] = _USER
        for name in ("eos", "eot", "eom"):
            if ids.get(name) is not None:
                eog.add(ids[name])  # type: ignore[arg-type]
        # o200k_harmony and solar-open: <|end|> ends a message, not the generation
        texts = {self._texts[t] for t in eog}
        end = lookup("<|end|>")
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if end in eog and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(end)
            attrs[end] = _USER
        # gemma4 and paddleocr: </s> is not an end of generation there
        s_id = lookup("</s>")
        if "<|tool_response>" in texts and s_id in eog:
            eog.discard(s_id)
            attrs[s_id] = _NORMAL
        self._eog: frozenset[int] = frozenset(eog)

    # -- properties -----------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self._texts)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def eom_id(self) -> int | None:
        return self._ids["eom"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every token that ends generation (llama.cpp's special_eog_ids)."""
        return self._eog

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._texts[self.bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._texts[self.eos_id]

    def special_ids(self) -> dict[str, int | None]:
        """bos, eos, eot, eom, unk, sep, pad, mask and the FIM ids (None where absent)."""
        return dict(self._ids)

    def __repr__(self) -> str:
        kind = "SPM" if self._spm is not None else f"BPE pre={self.pre!r}"
        return f"Tokenizer({self.name!r}, {kind}, n_vocab={self.n_vocab})"

    # -- per token ------------------------------------------------------------------------------

    def _check_id(self, tid: Any) -> int:
        try:
            i = operator.index(tid)
        except TypeError:
            raise UsageError(f"token id {tid!r} is not an integer") from None
        if not 0 <= i < len(self._texts):
            raise UsageError(
                f"token id {i} is out of range for {self.name} (vocabulary of {self.n_vocab})"
            )
        return i

    def token_text(self, tid: int) -> str:
        """The token as the vocabulary spells it (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        return self._texts[self._check_id(tid)]

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled exactly `text` in the vocabulary, or None."""
        return self._token_to_id.get(text)

    def token_attr(self, tid: int) -> TokenAttr:
        return TokenAttr(self._attrs[self._check_id(tid)])

    def is_control(self, tid: int) -> bool:
        return bool(self._attrs[self._check_id(tid)] & _CONTROL)

    def is_special(self, tid: int) -> bool:
        """Control or unknown: not rendered by decode(skip_special=True)."""
        return bool(self._attrs[self._check_id(tid)] & _HIDDEN)

    def is_user_defined(self, tid: int) -> bool:
        return bool(self._attrs[self._check_id(tid)] & _USER)

    def is_byte(self, tid: int) -> bool:
        return bool(self._attrs[self._check_id(tid)] & _BYTE)

    def is_eog(self, tid: int) -> bool:
        """Does this token end generation (eos, eot, eom, <|im_end|>, ...)?"""
        return tid in self._eog

    def token_to_bytes(self, tid: int) -> bytes:
        """The bytes the token stands for, special tokens rendered as their text (llama.cpp's
        token_to_piece with special=true). A byte token or part of a byte-level character may
        be an incomplete UTF-8 sequence."""
        i = self._check_id(tid)
        piece = self._pieces[i]
        if piece is None:
            piece = self._pieces[i] = self._render(i)
        return piece

    def _render(self, i: int) -> bytes:
        a = self._attrs[i]
        text = self._texts[i]
        if a & (_HIDDEN | _USER):
            return text.encode("utf-8")
        if a & _NORMAL:
            if self._spm is not None:
                return text.replace("\u2581", " ").encode("utf-8")
            return byte_decode(text)
        if a & _BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""  # unused / undefined tokens render as nothing, as in llama.cpp

    # -- encode ---------------------------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of the text (llama.cpp's tokenizer_st_partition): for each
        special token, longest first, every occurrence in the fragments still text."""
        frags: list[str | int] = [text]
        texts = self._texts
        for tid in self._special_parse if parse_special else self._special_always:
            s = texts[tid]
            if s not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, str) and s in f:
                    for k, part in enumerate(f.split(s)):
                        if k:
                            out.append(tid)
                        if part:
                            out.append(part)
                else:
                    out.append(f)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`.

        add_special: add BOS (and EOS) where the model asks for them (add_bos/add_eos).
        parse_special: turn the text of control tokens ("<|im_start|>") into those tokens;
        without it they are tokenized as plain text. User-defined tokens are always matched.
        """
        if not isinstance(text, str):
            raise UsageError(f"encode takes a str, not {type(text).__name__}")
        _check_unicode(text)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._ids["bos"])  # type: ignore[arg-type]
        out += self._encode_fragments(self._partition(text, parse_special) if text else [])
        if add_special and self.add_eos:
            out.append(self._ids["eos"])  # type: ignore[arg-type]
        return out

    def _encode_fragments(self, frags: list[str | int]) -> list[int]:
        """Token ids of a partitioned text: ids stay, text fragments go through the model's
        tokenizer (SPM: a space prefix on the first fragment and on each after a special)."""
        out: list[int] = []
        if self._spm is not None:
            prev_special = True  # the first fragment gets the space prefix
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    f = " " + f
                out += self._spm.encode(f.replace(" ", "\u2581"))
                prev_special = False
        else:
            assert self._bpe is not None
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out += self._bpe.encode(f)
        return out

    # -- decode ---------------------------------------------------------------------------------

    def _ids_list(self, ids: Iterable[int]) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # torch / numpy
        if isinstance(ids, int):
            ids = [ids]
        n = len(self._texts)
        out = list(ids)
        for i in out:
            if type(i) is not int or not 0 <= i < n:
                self._check_id(i)  # raises for a bad one; other integer types pass
        return [operator.index(i) for i in out]

    def decode_bytes(
        self, ids: Iterable[int], skip_special: bool = True, strip_leading_space: bool = True
    ) -> bytes:
        """The bytes of the token sequence (see decode)."""
        ids = self._ids_list(ids)
        attrs = self._attrs
        pieces = self._pieces
        strip = strip_leading_space and self.add_space_prefix
        out: list[bytes] = []
        for i in ids:
            if skip_special and attrs[i] & _HIDDEN:
                continue
            p = pieces[i]
            if p is None:
                p = pieces[i] = self._render(i)
            if strip:
                strip = False
                if p[:1] == b" ":
                    p = p[1:]
            out.append(p)
        return b"".join(out)

    def decode(
        self,
        ids: Iterable[int],
        skip_special: bool = True,
        clean_spaces: bool | None = False,
        strip_leading_space: bool = True,
    ) -> str:
        """Text of a token sequence.

        skip_special: leave out control and unknown tokens (BOS, <|im_end|>, ...).
        clean_spaces: llama.cpp's clean-up (" ," -> ","  " 's" -> "'s" ...): False (default,
            so that decode(encode(t)) == t), True, or None to do what llama.cpp does for this
            model.
        strip_leading_space: drop the space add_space_prefix (SentencePiece) put before the
            first word; pass False when decoding a continuation.
        Bytes that are not valid UTF-8 become U+FFFD.
        """
        data = self.decode_bytes(ids, skip_special, strip_leading_space)
        if clean_spaces or (clean_spaces is None and self.clean_spaces):
            data = clean_up_spaces(data)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True, strip_leading_space: bool = False):
        """A StreamDecoder for this tokenizer (feed ids one at a time, get text pieces)."""
        from kiln.tokenizer.streaming import StreamDecoder

        return StreamDecoder(
            self, skip_special=skip_special, strip_leading_space=strip_leading_space
        )

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The model's chat template applied to `messages` (see kiln.tokenizer.render_chat)."""
        from kiln.tokenizer.chat_template import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat: the template's markup becomes special tokens, what the
        messages (and tools, documents) say is text, even where it spells a control token
        ("<|im_end|>" in a user message is the characters, never the token); BOS added when the
        model asks for it and the template did not already write it. kwargs: render_chat's
        (template_name=, chat_template=, tools=, template variables)."""
        from kiln.tokenizer.chat_template import render_chat_protected

        text, marks = render_chat_protected(
            self,
            messages,
            add_generation_prompt=add_generation_prompt,
            protect=self._control_texts(),
            **kwargs,
        )
        _check_unicode(text)
        bos = self.bos_token
        add = self.add_bos and not (bos and text.startswith(bos))
        frags = self._partition(text, parse_special=True) if text else []
        if marks:
            table = str.maketrans(marks)
            restored: list[str | int] = []
            for f in frags:
                if isinstance(f, str) and not marks.keys().isdisjoint(f):
                    # the messages' own texts: user-defined tokens only, as encode() without
                    # parse_special
                    restored += self._partition(f.translate(table), parse_special=False)
                else:
                    restored.append(f)
            frags = restored
        ids = self._encode_fragments(frags)
        if add:
            ids.insert(0, self._ids["bos"])  # type: ignore[arg-type]
        return ids

    def _control_texts(self) -> tuple[str, ...]:
        """Texts that become a token only with parse_special (control, unknown), longest first."""
        if self._control is None:
            always = set(self._special_always)
            self._control = tuple(self._texts[i] for i in self._special_parse if i not in always)
        return self._control


def _check_unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(
                f"the text is not valid Unicode ({e.reason} at index {e.start})"
            ) from None


def _indices(attrs: list[int], mask: int) -> list[int]:
    """Indices of the tokens with any of the attribute bits in mask (numpy: ~5 ms at 150k)."""
    return np.flatnonzero(np.asarray(attrs, dtype=np.int32) & mask).tolist()


def clean_up_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_spaces passes over detokenized bytes: drop the space before ? ! . and
    ,; turn " ' " into "'"; drop the space before 's 'm 're 've."""
    t = bytearray(data)
    n = len(t)
    if n == 0:
        return b""
    # pass 1: " ?", " !", " .", " ,"
    total = 1
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: a lone apostrophe between spaces
    n, total, i = total, 1, 1
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: contractions " 's", " 'm", " 're", " 've"
    n, total = total, 1
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])

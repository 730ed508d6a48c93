"""Byte-level BPE (tokenizer.ggml.model = gpt2), built on the Hugging Face `tokenizers` library.

The GGUF holds the vocabulary and the merges; what it does not hold is how the text is split into
words before the merges run. llama.cpp keys that on tokenizer.ggml.pre and hard-codes a list of
regexes per name (src/llama-vocab.cpp, llm_tokenizer_bpe): each regex splits the pieces left by
the one before, and the pieces that no regex matches stay pieces of their own. Here that is a
`Sequence` of `Split(..., "isolated")` pre-tokenizers followed by the GPT-2 byte-to-unicode
mapping, feeding a BPE model whose ranks are the merge order, which is the same algorithm as
llama.cpp's (lowest rank first, leftmost on a tie).

Special tokens are not given to `tokenizers`: Tokenizer (vocab.py) cuts them out of the text the
way llama.cpp does and hands only the plain fragments to `BPEEncoder.encode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from kiln.errors import ConfigError, UnsupportedError

# The regexes as llama.cpp writes them (its adaptations of the tokenizer.json originals: the
# case-insensitive group spelled out, which Oniguruma reads the same way).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """What llama.cpp sets for one tokenizer.ggml.pre value."""

    regexes: tuple[str, ...]
    add_bos: bool = False  # default when the GGUF has no tokenizer.ggml.add_bos_token
    ignore_merges: bool = False  # a word that is a whole token is taken as is
    clean_spaces: bool = True  # llama.cpp's clean_up_tokenization_spaces on detokenize
    no_bos: bool = False  # the model has no BOS token unless the GGUF names one


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), add_bos=True, ignore_merges=True)


# tokenizer.ggml.pre names -> settings, grouped as llama.cpp's llm_tokenizer_bpe groups them
_GROUPS: list[tuple[str, PreTokenizer]] = [
    ("default", _DEFAULT),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", _LLAMA3_PRE),
    ("dbrx smaug-bpe", PreTokenizer((_LLAMA3,))),
    (
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "exaone4 mpt olmo jais",
        PreTokenizer((_GPT2,)),
    ),
    ("trillion granite-docling", PreTokenizer((_GPT2,), clean_spaces=False)),
    ("starcoder refact codeshell exaone minerva-7b mellum2", PreTokenizer((r"\p{N}", _GPT2))),
    ("smollm command-r", PreTokenizer((r"\p{N}", _GPT2), clean_spaces=False)),
    (
        "qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2",
        PreTokenizer((_QWEN2,), clean_spaces=False),
    ),
    ("megrez stablelm2", PreTokenizer((_QWEN2,))),
    ("qwen35", PreTokenizer((_QWEN35,), clean_spaces=False)),
    ("glm4 chatglm-bpe", PreTokenizer((_LLAMA3,), no_bos=True)),
    ("falcon", PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
]
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    name: spec for names, spec in _GROUPS for name in names.split()
}


def pre_tokenizer_for(pre: str | None, source: str) -> PreTokenizer:
    if pre is None or pre == "":
        # llama.cpp warns ("GENERATION QUALITY WILL BE DEGRADED") and uses 'default'
        return _DEFAULT
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise UnsupportedError(
            f"{source}: the BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported by "
            f"Kiln; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return spec


@lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's map from a byte to the printable character that stands for it in the vocab."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: list[str] = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table)


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_unicode())}


def byte_decode(text: str) -> bytes:
    """A byte-level token's text back to its bytes, as llama.cpp's llama_decode_text does
    (a character outside the byte map becomes '[UNK_BYTE_0x..<text>]')."""
    table = unicode_to_byte()
    out = bytearray()
    for ch in text:
        b = table.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode() + b"]"
    return bytes(out)


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    # llama.cpp splits "a b" at the first space after the first character, so that a merge
    # whose left part is a space itself still parses
    pairs: list[tuple[str, str]] = []
    for m in merges:
        i = m.find(" ", 1)
        pairs.append((m[:i], m[i + 1 :]) if i > 0 else ("", ""))
    return pairs


def _fast_merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    # When every merge has exactly one space and none a newline, one join and one split do the
    # work in C, about 3x faster than a loop over 150k merges.
    try:
        joined = "\n".join(merges)
    except TypeError:
        raise ConfigError("tokenizer.ggml.merges is not a list of strings") from None
    if joined.count(" ") != len(merges) or joined.count("\n") != len(merges) - 1:
        return _merge_pairs(merges)
    flat = joined.replace(" ", "\n").split("\n")
    if "" in flat[0::2]:  # a merge starting with its separator space
        return _merge_pairs(merges)
    return list(zip(flat[0::2], flat[1::2]))


class BPEEncoder:
    """Encodes plain text (no special tokens) into token ids."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        merges: list[str],
        spec: PreTokenizer,
        source: str,
    ) -> None:
        pairs = _fast_merge_pairs(merges) if merges else []
        try:
            model = _build_bpe(token_to_id, pairs, spec.ignore_merges)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise ConfigError(f"{source}: the BPE vocabulary cannot be built ({e})") from None
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in spec.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def _build_bpe(
    token_to_id: dict[str, int], pairs: list[tuple[str, str]], ignore_merges: bool
) -> models.BPE:
    try:
        return models.BPE(token_to_id, pairs, ignore_merges=ignore_merges)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException:  # noqa: B036 - pyo3's PanicException is a BaseException
        pass
    # tokenizers refuses (or panics on) a merge whose parts or result are not tokens; llama.cpp
    # keeps such a merge and falls back to bytes where its result is not a token. Dropping
    # those merges can differ from llama.cpp only on such a vocabulary; converted models have
    # none.
    pairs = [
        p
        for p in pairs
        if p[0] in token_to_id and p[1] in token_to_id and (p[0] + p[1]) in token_to_id
    ]
    return models.BPE(token_to_id, pairs, ignore_merges=ignore_merges)

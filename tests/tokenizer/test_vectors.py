"""llama.cpp's tokenizer test vectors (ggml-vocab-*.gguf.inp/.out) and the vocabularies' ids.

The vectors were made by Hugging Face tokenizers (llama.cpp's convert_hf_to_gguf_update.py) and
llama.cpp's test-tokenizer-0 checks them with add_special=false, parse_special=false; so do we.
"""

from __future__ import annotations

import time
from functools import cache

import pytest

from kiln.gguf.reader import read_gguf
from kiln.tokenizer import Tokenizer
from tests.conftest import shared_path

VOCABS = ["qwen2", "llama-bpe", "llama-spm", "gpt-2"]
_load_seconds: dict[str, float] = {}


@cache
def load_vocab(name: str) -> Tokenizer:
    model = read_gguf(shared_path("vocab", f"ggml-vocab-{name}.gguf"))
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(model)
    _load_seconds[name] = time.perf_counter() - t0
    return tok


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """Split the .inp exactly as test-tokenizer-0.cpp does: on "\\n__ggml_vocab_test__\\n"."""
    inp = shared_path("vocab", f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    out = shared_path("vocab", f"ggml-vocab-{name}.gguf.out").read_text("utf-8").split("\n")
    sep = "\n__ggml_vocab_test__\n"
    texts: list[str] = []
    pos = 0
    while pos < len(inp):
        nxt = inp.find(sep, pos)
        if nxt < 0:
            texts.append(inp[pos:])
            break
        texts.append(inp[pos:nxt])
        pos = nxt + len(sep)
    if out and out[-1] == "":
        out.pop()
    assert len(texts) == len(out), (len(texts), len(out))
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, out)]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name):
    tok = load_vocab(name)
    vectors = read_vectors(name)
    assert len(vectors) == 46
    failures = []
    for text, expected in vectors:
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append(f"{text!r}: expected {expected}, got {got}")
    assert not failures, f"{len(failures)} of {len(vectors)} vectors differ:\n" + "\n".join(
        failures
    )


@pytest.mark.parametrize("name", VOCABS)
def test_vectors_round_trip(name):
    tok = load_vocab(name)
    for text, expected in read_vectors(name):
        assert tok.decode(expected) == text
        assert tok.decode(tok.encode(text, add_special=True)) == text


def test_load_time():
    """Building the tokenizer from decoded metadata (the GGUF read not counted). Measured on an
    idle 16-core x86 host: qwen2 (152k tokens, 151k merges) 0.30 s, llama-bpe (128k, 280k merges)
    0.49 s, gpt-2 0.11 s."""
    for name in VOCABS:
        load_vocab(name)
    assert _load_seconds.get("qwen2", 0.0) < 5.0, _load_seconds  # generous: shared CI cores


@pytest.mark.parametrize(
    "name, bos, eos, eot, eog, add_bos",
    [
        ("qwen2", 151643, 151643, 151645, {151643, 151645, 128247}, False),
        ("llama-bpe", 128000, 128001, 128009, {128001, 128009}, True),
        ("llama-spm", 1, 2, None, {2}, True),
        ("gpt-2", 50256, 50256, 50256, {50256}, False),
    ],
)
def test_special_ids_match_llama_cpp(name, bos, eos, eot, eog, add_bos):
    # values printed by llama.cpp's libllama (peer build 0c1e570) for the same files
    tok = load_vocab(name)
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (bos, eos, eot)
    assert tok.eog_ids == eog
    assert tok.add_bos is add_bos
    assert all(tok.is_eog(i) for i in eog)


def test_llama3_bos_and_special_parsing():
    tok = load_vocab("llama-bpe")
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    plain = tok.encode(text)
    assert plain[0] == 128000 and 128006 not in plain  # special text is plain text by default
    parsed = tok.encode(text, parse_special=True)
    assert parsed[:4] == [128000, 128006, 882, 128007]
    assert parsed[-1] == 128009
    assert tok.decode(parsed) == "user\n\nHi"
    assert tok.decode(parsed, skip_special=False) == "<|begin_of_text|>" + text


def test_clean_spaces_as_llama_cpp():
    tok = load_vocab("gpt-2")
    ids = tok.encode("Hello , world ! It 's")
    assert tok.decode(ids) == "Hello , world ! It 's"
    assert tok.clean_spaces
    assert tok.decode(ids, clean_spaces=None) == "Hello, world! It's"
    assert tok.decode(ids, clean_spaces=True) == "Hello, world! It's"

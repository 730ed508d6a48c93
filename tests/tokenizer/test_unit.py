"""Tokenizer behaviour on small vocabularies built in memory (no files needed)."""

from __future__ import annotations

import pytest

from kiln.errors import ConfigError, UnsupportedError, UsageError
from kiln.tokenizer import StreamDecoder, TokenAttr, Tokenizer
from kiln.tokenizer.bpe import byte_to_unicode
from kiln.tokenizer.vocab import clean_up_spaces

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def spm_metadata(**extra):
    """<unk> <s> </s>, 256 byte tokens, then pieces with scores (higher merges first)."""
    pieces = [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("ab", -5.0),
        ("▁a", -6.0),
        ("abc", -7.0),
        ("▁ab", -8.0),
        ("bc", -0.5),
        ("▁▁", -9.0),
        ("<tool>", 0.0),
        ("<|ctl|>", 0.0),
        ("zz", -10.0),
        ("unused_x", 0.0),
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    for text, score in pieces:
        tokens.append(text)
        scores.append(score)
        types.append({"<tool>": USER, "<|ctl|>": CONTROL, "zz": UNUSED}.get(text, NORMAL))
    md = {
        "general.name": "tiny-spm",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    md.update(extra)
    return md


def bpe_metadata(pre="gpt-2", **extra):
    """Byte-level alphabet plus a few merges and special tokens."""
    alphabet = list(byte_to_unicode())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = alphabet + [m.replace(" ", "") for m in merges]
    types = [NORMAL] * len(tokens)
    for text, ty in (("<|endoftext|>", CONTROL), ("<|im_end|>", NORMAL), ("<tool>", USER)):
        tokens.append(text)
        types.append(ty)
    md = {
        "general.name": "tiny-bpe",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
    }
    md.update(extra)
    return md


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_gguf(spm_metadata())


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.from_gguf(bpe_metadata())


def ids_of(tok, *texts):
    return [tok.token_id(t) for t in texts]


# -- SentencePiece ---------------------------------------------------------------------------


def test_spm_merges_by_score(spm):
    # "▁abc": pairs ▁a (-6), ab (-5), bc (-0.5): bc first; then ▁a (-6) beats a+bc (-7), and
    # "▁abc" is no token. Checked against llama.cpp on this vocabulary written as a GGUF.
    assert spm.encode("abc", add_special=False) == ids_of(spm, "▁a", "bc")
    assert spm.encode("ab", add_special=False) == ids_of(spm, "▁ab")
    assert spm.encode("ab", add_special=True) == [1] + ids_of(spm, "▁ab")
    assert spm.encode("", add_special=True) == [1]
    assert spm.encode("", add_special=False) == []


def test_spm_byte_fallback(spm):
    ids = spm.encode("é", add_special=False)  # not in the vocabulary: its two UTF-8 bytes
    assert ids == ids_of(spm, "▁", "<0xC3>", "<0xA9>")
    assert spm.decode(ids) == "é"
    assert spm.decode([spm.token_id("<0xC3>")]) == "\ufffd"  # half a character


def test_spm_special_tokens(spm):
    # user-defined tokens are always matched; control tokens only with parse_special
    assert spm.encode("a<tool>b", add_special=False) == ids_of(spm, "▁a", "<tool>", "▁", "b")
    plain = spm.encode("a<|ctl|>", add_special=False)
    assert spm.token_id("<|ctl|>") not in plain
    parsed = spm.encode("a<|ctl|>b", add_special=False, parse_special=True)
    assert parsed == ids_of(spm, "▁a", "<|ctl|>", "▁", "b")  # space prefix after a special
    assert spm.decode(parsed) == "a b"
    assert spm.decode(parsed, skip_special=False) == "a<|ctl|> b"


def test_spm_no_space_prefix():
    tok = Tokenizer.from_gguf(spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert tok.encode("ab", add_special=False) == ids_of(tok, "ab")
    assert tok.decode(tok.encode(" ab")) == " ab"


def test_spm_attributes(spm):
    assert spm.token_attr(0) == TokenAttr.UNKNOWN
    assert spm.is_control(1) and spm.is_special(1) and spm.is_special(0)
    assert spm.is_user_defined(spm.token_id("<tool>")) and not spm.is_special(
        spm.token_id("<tool>")
    )
    assert spm.token_to_bytes(spm.token_id("zz")) == b""  # unused: renders as nothing
    assert spm.token_to_bytes(spm.token_id("▁ab")) == b" ab"
    assert spm.eog_ids == {2} and spm.eot_id is None
    assert spm.special_ids()["unk"] == 0


def test_spm_add_eos():
    tok = Tokenizer.from_gguf(spm_metadata(**{"tokenizer.ggml.add_eos_token": True}))
    assert tok.encode("a") == [1, tok.token_id("▁a"), 2]
    assert tok.encode("a", add_special=False) == [tok.token_id("▁a")]


# -- BPE ---------------------------------------------------------------------------------------


def test_bpe_merges_and_bytes(bpe):
    ids = bpe.encode("hello world")
    assert ids == ids_of(bpe, "hello", "Ġworld")
    assert bpe.encode("hello  world!") == ids_of(bpe, "hello", "Ġ", "Ġworld", "!")
    assert bpe.decode(bpe.encode("héllo 😀")) == "héllo 😀"
    assert not bpe.add_bos and bpe.encode("hello", add_special=True) == ids_of(bpe, "hello")


def test_bpe_special_tokens_and_eog(bpe):
    end, im_end, tool = ids_of(bpe, "<|endoftext|>", "<|im_end|>", "<tool>")
    assert bpe.eog_ids == {end, im_end}
    assert bpe.is_control(im_end)  # typed normal, but llama.cpp treats its text as control
    assert bpe.eot_id == im_end
    assert bpe.encode("hello<tool>")[-1] == tool
    assert end not in bpe.encode("hello<|endoftext|>")
    assert bpe.encode("hello<|endoftext|>", parse_special=True)[-1] == end
    assert bpe.decode([bpe.token_id("hello"), end, tool]) == "hello<tool>"
    assert bpe.decode([bpe.token_id("hello"), end], skip_special=False) == "hello<|endoftext|>"


def test_bpe_pre_tokenizers_differ():
    text = "hello 12345"
    gpt2 = Tokenizer.from_gguf(bpe_metadata("gpt-2"))
    smol = Tokenizer.from_gguf(bpe_metadata("smollm"))
    llama3 = Tokenizer.from_gguf(bpe_metadata("llama-bpe"))
    assert gpt2.encode(text)[-5:] == ids_of(gpt2, "1", "2", "3", "4", "5")
    # llama3 splits digits in threes, smollm one by one; both round-trip
    for tok in (gpt2, smol, llama3):
        assert tok.decode(tok.encode(text)) == text
    assert llama3.add_bos and llama3.encode("hi")[0] == llama3.bos_id


def test_unknown_pre_tokenizer():
    with pytest.raises(UnsupportedError, match=r"'mystery'.*supported: .*qwen2"):
        Tokenizer.from_gguf(bpe_metadata("mystery"))


def test_missing_pre_is_default():
    md = bpe_metadata()
    del md["tokenizer.ggml.pre"]
    tok = Tokenizer.from_gguf(md)
    assert tok.decode(tok.encode("hello, world")) == "hello, world"


# -- errors ------------------------------------------------------------------------------------


def test_no_tokenizer():
    with pytest.raises(UnsupportedError, match="has no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "llama", "general.name": "bare"})
    with pytest.raises(UnsupportedError, match="has no tokenizer"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "none"})
    md = spm_metadata()
    del md["tokenizer.ggml.tokens"]
    with pytest.raises(ConfigError, match="tokenizer.ggml.tokens is missing"):
        Tokenizer.from_gguf(md)


def test_unsupported_model_type():
    with pytest.raises(UnsupportedError, match=r"'bert'.*supported: llama, gpt2"):
        Tokenizer.from_gguf(spm_metadata(**{"tokenizer.ggml.model": "bert"}))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tokenizer.ggml.tokens": ["a", "a", "b"]}, "duplicate token"),
        ({"tokenizer.ggml.tokens": ["a", 3]}, "not a list of strings"),
        ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries"),
        ({"tokenizer.ggml.scores": [0.0]}, "scores has fewer entries"),
        (
            {
                "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.bos_token_id": 10**6,
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.merges": [],
            },
            "bos_token_id is not set",
        ),
    ],
)
def test_bad_metadata(change, match):
    md = spm_metadata()
    md.update(change)
    if "tokenizer.ggml.tokens" in change:
        md.pop("tokenizer.ggml.token_type")
        md.pop("tokenizer.ggml.scores")
    with pytest.raises(ConfigError, match=match):
        Tokenizer.from_gguf(md)


def test_bpe_without_merges():
    md = bpe_metadata()
    del md["tokenizer.ggml.merges"]
    with pytest.raises(ConfigError, match="merges"):
        Tokenizer.from_gguf(md)


def test_bad_merges_are_dropped_like_missing_tokens():
    md = bpe_metadata()
    md["tokenizer.ggml.merges"] = md["tokenizer.ggml.merges"] + ["x y"]  # "xy" is no token
    tok = Tokenizer.from_gguf(md)
    assert tok.encode("hello xy") == ids_of(tok, "hello", "Ġ", "x", "y")


def test_usage_errors(spm):
    with pytest.raises(UsageError, match="out of range"):
        spm.decode([5, spm.n_vocab])
    with pytest.raises(UsageError, match="out of range"):
        spm.decode([-1])
    with pytest.raises(UsageError, match="not an integer"):
        spm.decode(["a"])
    with pytest.raises(UsageError, match="out of range"):
        spm.token_to_bytes(10**9)
    with pytest.raises(UsageError, match="takes a str"):
        spm.encode(b"bytes")
    with pytest.raises(UsageError, match="not valid Unicode"):
        spm.encode("a\ud800b")
    with pytest.raises(UsageError, match="GGUFModel"):
        Tokenizer.from_gguf(42)


def test_decode_accepts_numpy_and_torch(spm):
    import numpy as np
    import torch

    ids = spm.encode("ab")
    assert spm.decode(np.array(ids)) == "ab"
    assert spm.decode(torch.tensor(ids)) == "ab"


def test_clean_up_spaces():
    assert clean_up_spaces(b"a , b . c ! d ? e") == b"a, b. c! d? e"
    assert clean_up_spaces(b"it ' s") == b"it's"
    assert clean_up_spaces(b"it 's I 'm we 're they 've don 't I 'd we 'll") == (
        b"it's I'm we're they've don 't I 'd we 'll"
    )
    assert clean_up_spaces(b"") == b""


# -- streaming ---------------------------------------------------------------------------------


def test_stream_holds_incomplete_characters(spm):
    b = {x: spm.token_id(f"<0x{x:02X}>") for x in range(256)}
    dec = StreamDecoder(spm)
    # 😀 = F0 9F 98 80, 中 = E4 B8 AD
    assert [dec.feed(b[x]) for x in (0xF0, 0x9F, 0x98)] == ["", "", ""]
    assert dec.pending == b"\xf0\x9f\x98"
    assert dec.feed(b[0x80]) == "😀"
    assert dec.feed(b[0xE4]) == "" and dec.feed(b[0xB8]) == "" and dec.feed(b[0xAD]) == "中"
    assert dec.flush() == ""


def test_stream_invalid_bytes(spm):
    b = {x: spm.token_id(f"<0x{x:02X}>") for x in range(256)}
    dec = StreamDecoder(spm)
    assert dec.feed(b[0x80]) == "\ufffd"  # a lone continuation byte is invalid at once
    assert dec.feed(b[0xE4]) == ""
    assert dec.feed(spm.token_id("a")) == "\ufffda"  # E4 then "a": provably invalid
    assert dec.feed(b[0xE4]) == "" and dec.feed(b[0xB8]) == ""
    assert dec.flush() == "\ufffd"  # incomplete at the end
    assert dec.feed(spm.token_id("▁a")) == " a"  # reusable after flush


def test_stream_matches_decode(spm):
    ids = spm.encode("ab é <tool> abc", parse_special=True)
    for skip in (True, False):
        dec = spm.stream_decoder(skip_special=skip, strip_leading_space=True)
        text = dec.feed_many(ids) + dec.flush()
        assert text == spm.decode(ids, skip_special=skip)
    dec = spm.stream_decoder()  # a continuation keeps the space before its first word
    assert dec.feed(spm.token_id("▁ab")) == " ab"


def test_stream_skips_control(bpe):
    dec = bpe.stream_decoder()
    end = bpe.token_id("<|endoftext|>")
    assert dec.feed(bpe.token_id("hello")) == "hello"
    assert dec.feed(end) == ""
    assert bpe.stream_decoder(skip_special=False).feed(end) == "<|endoftext|>"
    with pytest.raises(UsageError):
        dec.feed(bpe.n_vocab)

"""stories260K (SentencePiece, vocab 512) and the demo model (SmolLM2, BPE pre=smollm).

Expected ids were produced by llama.cpp's libllama (peer build 0c1e570, llama_tokenize) on the
same files.
"""

from __future__ import annotations

import pytest

from kiln.gguf.reader import read_gguf
from kiln.tokenizer import Tokenizer

VARIED = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "digits 0 12 345 6789 3.14159 1e-9 ١٢٣",
    "naïve café, Straße, Ørsted, Ελληνικά, русский",
    "中文测试：你好，世界！ 日本語のテキスト 한국어",
    "emoji 😀👍🏽🇫🇷❤️🦙 and ZWJ 👨‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "special-looking <|im_start|> <s> </s> text",
    "a" * 300,
    " ",
    "",
]


@pytest.fixture(scope="module")
def stories(stories_model) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(stories_model))


@pytest.fixture(scope="module")
def smol(demo_model) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(demo_model))


# -- stories260K: SentencePiece with byte fallback ------------------------------------------------


def test_stories_matches_llama_cpp(stories):
    assert stories.n_vocab == 512
    assert (stories.bos_id, stories.eos_id, stories.unk_id) == (1, 2, 0)
    assert stories.add_bos and stories.add_space_prefix
    assert stories.encode("Once upon a time, there was a little girl named Lily.") == [
        1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426,
    ]  # fmt: skip
    # byte fallback for what the 512-token vocabulary lacks (digits, emoji, CJK)
    assert stories.encode("Hello  world\n\n  1234 😀 中文") == [
        1, 346, 306, 414, 410, 263, 304, 341, 13, 13, 410, 410, 475, 479, 472, 484, 410, 243,
        162, 155, 131, 410, 231, 187, 176, 233, 153, 138,
    ]  # fmt: skip
    assert stories.encode("<s>hi</s>") == [1, 410, 504, 419, 505, 415, 417, 504, 492, 419, 505]
    assert stories.encode("<s>hi</s>", parse_special=True) == [1, 1, 270, 417, 2]
    assert stories.eog_ids == {2}


@pytest.mark.parametrize("text", VARIED)
def test_stories_round_trip(stories, text):
    ids = stories.encode(text)
    assert ids[0] == stories.bos_id
    assert stories.decode(ids) == text
    assert stories.decode(ids[1:]) == text  # without BOS the first word's space is dropped too
    assert stories.decode(ids[1:], strip_leading_space=False) == (" " + text if text else "")


def test_stories_decode_special(stories):
    ids = stories.encode("Hi", add_special=True) + [stories.eos_id]
    assert stories.decode(ids) == "Hi"
    assert stories.decode(ids, skip_special=False) == "<s> Hi</s>"  # as llama.cpp renders it
    assert stories.token_to_bytes(13) == b"\n"  # <0x0A>
    assert stories.is_byte(13) and not stories.is_special(13)
    assert stories.is_control(1) and stories.is_special(0) and not stories.is_control(0)


def test_stories_streaming_byte_fallback(stories):
    text = "A 😀 and 中文 here"
    ids = stories.encode(text, add_special=False)
    dec = stories.stream_decoder(strip_leading_space=True)
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    # the emoji is 4 byte tokens: nothing comes out until the last one
    for p in pieces:
        assert "\ufffd" not in p
    assert any(p.endswith("😀") for p in pieces)


# -- SmolLM2 (demo model): byte-level BPE, pre-tokenizer smollm -----------------------------------


def test_smol_matches_llama_cpp(smol):
    assert smol.n_vocab == 49152
    assert not smol.add_bos and smol.pre == "smollm"
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.eog_ids == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame> (FIM repo)
    assert smol.encode("Hello world") == [19556, 905]
    assert smol.encode(
        "Hello, world! It's 2024-11-22 at 10:30.\n\tdef f(x):\n        return x**2"
    ) == [
        19556, 28, 905, 17, 657, 506, 216, 34, 32, 34, 36, 29, 33, 33, 29, 34, 34, 418, 216,
        33, 32, 42, 35, 32, 30, 198, 197, 1604, 275, 24, 104, 727, 448, 1003, 1792, 828, 34,
    ]  # fmt: skip
    assert smol.encode("😀 中文 naïve café") == [
        10813, 242, 218, 216, 28589, 29184, 15486, 46494, 37366,
    ]  # fmt: skip
    chat = "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    assert smol.encode(chat, parse_special=True) == [
        1, 4093, 198, 26843, 665, 17, 2, 198, 1, 520, 9531, 198,
    ]  # fmt: skip
    assert smol.encode(chat)[:6] == [44, 108, 306, 79, 3738, 108]  # "<|im_start|>" as text


@pytest.mark.parametrize("text", VARIED)
def test_smol_round_trip(smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    assert smol.decode(ids, clean_spaces=None) == text  # smollm: llama.cpp does no clean-up


def test_smol_against_hf_tokenizers(smol, demo_model):
    """The same vocabulary run through tokenizers the way SmolLM2's tokenizer.json spells it
    (Digits + ByteLevel with its built-in GPT-2 regex, special tokens added): same ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    md = read_gguf(demo_model).metadata
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    hf = Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = [t for i, t in enumerate(md["tokenizer.ggml.tokens"]) if smol.is_control(i)]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    texts = VARIED + [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
        "mixed 12abc34 '''quotes''' and 's 't 're 've 'm 'll 'd",
        "\n\n\n   \t  x  \n",
    ]
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert smol.encode(text, add_special=False, parse_special=True) == expected, text
        assert smol.decode(expected, skip_special=False) == hf.decode(
            expected, skip_special_tokens=False
        )


def test_smol_streaming_splits_utf8(smol):
    text = "Ok 😀🇫🇷 中文 naïve"
    ids = smol.encode(text)
    # some tokens end inside a character: their bytes alone are not valid UTF-8
    partial = [i for i in ids if _incomplete(smol.token_to_bytes(i))]
    assert partial, "expected byte-level tokens that split a character"
    dec = smol.stream_decoder()
    out = []
    for i in ids:
        piece = dec.feed(i)
        assert "\ufffd" not in piece
        out.append(piece)
    out.append(dec.flush())
    assert "".join(out) == text == smol.decode(ids)


def test_smol_chat_template(smol):
    messages = [{"role": "user", "content": "Hi there!"}]
    text = smol.render_chat(messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol.encode_chat(messages)
    assert ids == smol.encode(text, add_special=False, parse_special=True)
    assert ids[0] == 1 and ids[-3:] == [520, 9531, 198]


def _incomplete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False

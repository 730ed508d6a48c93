"""Tokenizers from GGUF metadata, matching llama.cpp, and chat templates.

    tok = Tokenizer.from_gguf(model)          # GGUFModel, metadata dict or path
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)                    # special tokens skipped
    stream = tok.stream_decoder()             # feed(id) -> complete text so far
    prompt = render_chat(tok, [{"role": "user", "content": "Hi"}])
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])

vocab.py holds Tokenizer (llama.cpp's vocabulary rules), bpe.py the byte-level BPE on HF
`tokenizers`, spm.py the SentencePiece merge-by-score, streaming.py StreamDecoder,
chat_template.py the Jinja rendering.
"""

from __future__ import annotations

from kiln.tokenizer.chat_template import ChatTemplateError, render_chat, validate_messages
from kiln.tokenizer.streaming import StreamDecoder
from kiln.tokenizer.vocab import TokenAttr, Tokenizer

__all__ = [
    "ChatTemplateError",
    "StreamDecoder",
    "TokenAttr",
    "Tokenizer",
    "render_chat",
    "validate_messages",
]

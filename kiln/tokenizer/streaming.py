"""Streaming detokenization: token ids in, one at a time; text out, never half a character.

A token is a run of bytes, not of characters: a byte-fallback token (<0xF0>) or a byte-level BPE
token can end in the middle of a multi-byte UTF-8 character. The decoder keeps such a tail until
the bytes that complete it arrive. Bytes that can never become a character (a stray continuation
byte, a lead byte followed by a non-continuation) are U+FFFD as soon as that is certain; an
incomplete character still pending at the end becomes U+FFFD on flush(). This is Python's
incremental UTF-8 decoder with errors="replace", which behaves exactly so.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from kiln.tokenizer.vocab import _HIDDEN

if TYPE_CHECKING:
    from kiln.tokenizer.vocab import Tokenizer


class StreamDecoder:
    """Feed ids with `feed(id)` (or `feed_many(ids)`), each returning the text that is now
    complete (maybe ""); call `flush()` at the end for what is left.

    skip_special: control and unknown tokens (BOS, <|im_end|>) give no text.
    strip_leading_space: drop the space SentencePiece's add_space_prefix put before the first
        word (use when the stream starts the text, e.g. generating right after BOS).
    The concatenation of all pieces equals tokenizer.decode(all ids, skip_special,
    strip_leading_space=strip_leading_space).
    """

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special: bool = True, strip_leading_space: bool = False
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._strip = strip_leading_space and tokenizer.add_space_prefix
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        tok = self._tok
        data = tok.token_to_bytes(token_id)  # checks the id
        if self._skip and tok._attrs[token_id] & _HIDDEN:
            return ""
        if self._strip:
            self._strip = False
            if data[:1] == b" ":
                data = data[1:]
        return self._dec.decode(data)

    def feed_many(self, token_ids) -> str:
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """The rest; an incomplete character at the end becomes U+FFFD. The decoder can be
        reused afterwards (as a fresh stream that does not strip a leading space)."""
        return self._dec.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes held back because they may be the start of a character."""
        return self._dec.getstate()[0]

"""Incremental detokenization for streaming.

SentencePiece drops the leading space of the first piece it decodes and byte-fallback tokens may split one UTF-8
character over several tokens, so text is never decoded token by token. Instead each step decodes a short window
twice, tokens[prefix:read] and tokens[prefix:], and emits the difference; when the new text ends in an incomplete
character (U+FFFD) nothing is emitted until a later token completes it.
"""

from __future__ import annotations

from typing import Callable

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens before this are already emitted

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self.tokens.extend(token_ids)
        seen = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if text.endswith(_INCOMPLETE) or len(text) <= len(seen):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(seen):]

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (an incomplete character shows as U+FFFD)."""
        seen = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(seen):]

"""The tokenizer as llguidance sees it, for grammar-constrained decoding (structured output, forced tool calls).

llguidance walks a trie of every token's bytes to compute which tokens a grammar allows next. SentencePiece pieces
become bytes here: "\u2581" is a space and "<0xNN>" the byte NN. Control tokens are named in angle brackets, the
only form llguidance's grammars can refer to, so "[TOOL_CALLS]" is `<TOOL_CALLS>` in a grammar.

Encoding must not add SentencePiece's dummy leading space (llguidance would read a space that the grammar never
asked for into every forced string), so text is encoded after a newline whose tokens are then dropped.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from cluster.tokenizer.mistral import Tokenizer, load_tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ANCHOR = "\n"


def special_token_name(piece: str) -> str:
    """'[TOOL_CALLS]' -> '<TOOL_CALLS>'; pieces already in angle brackets ('</s>') stay."""
    return f"<{piece[1:-1]}>" if piece.startswith("[") and piece.endswith("]") else piece


class _Vocabulary:
    """The duck-typed tokenizer `llguidance.TokenizerWrapper` reads."""

    def __init__(self, tok: Tokenizer):
        raw = tok.raw
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(tok.vocab_size):
            piece = raw.id_to_piece(i)
            if raw.is_special(i):
                self.special_token_ids.append(i)
                self.tokens.append(special_token_name(piece).encode())
            elif m := _BYTE_PIECE.fullmatch(piece):
                self.tokens.append(bytes([int(m.group(1), 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._encode = raw.encode
        self._anchor = raw.encode(_ANCHOR, bos=False, eos=False)

    def __call__(self, text: str) -> list[int]:
        ids = self._encode(_ANCHOR + text, bos=False, eos=False)
        if ids[:len(self._anchor)] != self._anchor:  # the anchor merged with the text: cannot happen for "\n"
            raise ValueError(f"cannot encode {text[:40]!r} without a leading space")
        return ids[len(self._anchor):]


@lru_cache(maxsize=None)
def grammar_tokenizer(version: str) -> Any:
    """The `llguidance.LLTokenizer` of a tokenizer version (built once per process: it walks the vocabulary)."""
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_vocabulary(version)))


def token_bytes(version: str) -> list[bytes]:
    """Every token's bytes as the grammar engine sees them (control tokens as '<NAME>')."""
    return _vocabulary(version).tokens


def special_token_ids(version: str) -> set[int]:
    """The control tokens: they have no text."""
    return set(_vocabulary(version).special_token_ids)


@lru_cache(maxsize=None)
def _vocabulary(version: str) -> _Vocabulary:
    return _Vocabulary(load_tokenizer(version))

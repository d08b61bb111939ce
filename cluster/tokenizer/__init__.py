"""Offline Mistral tokenizers (mistral-common), chat encoding and streaming detokenization.

The mistral-common names load on first use, so the engine (which needs only the detokenizer) imports on machines
without mistral-common, such as the GPU check's.
"""

from typing import Any

from cluster.tokenizer.detokenizer import IncrementalDetokenizer

_MISTRAL = {"Tokenizer", "TokenizerError", "load_tokenizer", "resolve_tokenizer_version"}
__all__ = ["IncrementalDetokenizer", *sorted(_MISTRAL)]


def __getattr__(name: str) -> Any:
    if name in _MISTRAL:
        from cluster.tokenizer import mistral

        return getattr(mistral, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

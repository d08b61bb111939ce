"""Offline Mistral tokenizers (mistral-common), chat encoding and streaming detokenization."""

from cluster.tokenizer.detokenizer import IncrementalDetokenizer
from cluster.tokenizer.mistral import Tokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_version

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError", "load_tokenizer", "resolve_tokenizer_version"]

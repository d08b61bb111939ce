"""The mistral-common tokenizer of a checkpoint: v3 for Mixtral 8x22B, v1 for Mixtral 8x7B and Mistral 7B."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from cluster.config import TOKENIZER_VERSIONS, ModelConfig

# Vocabulary sizes of the released checkpoints and the tokenizer each was trained with.
_VERSION_BY_VOCAB = {32768: "v3", 32000: "v1"}


class TokenizerError(ValueError):
    """A tokenizer that cannot be chosen, or a chat that cannot be encoded; the message says why."""


def resolve_tokenizer_version(config: ModelConfig, explicit: str | None = None) -> str:
    """An explicit choice, else the one the checkpoint records, else the one its vocabulary size implies."""
    version = explicit or config.tokenizer_version or _VERSION_BY_VOCAB.get(config.vocab_size)
    if version is None:
        raise TokenizerError(f"cannot tell the tokenizer of a model with vocab_size {config.vocab_size}: "
                             f"pass one of {', '.join(TOKENIZER_VERSIONS)}")
    if version not in TOKENIZER_VERSIONS:
        raise TokenizerError(f"unknown tokenizer version {version!r}: choose one of {', '.join(TOKENIZER_VERSIONS)}")
    return version


class Tokenizer:
    """Text and chat encoding for one tokenizer version; decoding drops control tokens."""

    def __init__(self, version: str):
        if version not in TOKENIZER_VERSIONS:
            raise TokenizerError(f"unknown tokenizer version {version!r}: choose one of {', '.join(TOKENIZER_VERSIONS)}")
        self.version = version
        self.mistral: MistralTokenizer = getattr(MistralTokenizer, version)()
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.vocab_size: int = self.raw.n_words
        self.bos_id: int = self.raw.bos_id
        self.eos_id: int = self.raw.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)

    def piece(self, token_id: int) -> str:
        return self.raw.id_to_piece(token_id)

    def is_control(self, token_id: int) -> bool:
        """Whether a token is a control token (BOS, EOS, [TOOL_CALLS], ...), which decoded text leaves out."""
        return self.raw.is_special(token_id)

    @property
    def tool_calls_token(self) -> int | None:
        """The id of [TOOL_CALLS], which starts a turn's tool calls; None for tokenizers without tools (v1)."""
        token_id = self.control_token("[TOOL_CALLS]")
        return token_id if self.piece(token_id) == "[TOOL_CALLS]" else None

    def control_token(self, name: str) -> int:
        """The id of a control token such as '[TOOL_CALLS]'."""
        return self.raw.get_special_token(name)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """OpenAI-style messages (system/user/assistant/tool) and tools, encoded by mistral-common's own rules."""
        try:
            request = ChatCompletionRequest.from_openai(messages, tools=tools or None)
            return self.mistral.encode_chat_completion(request).tokens
        except Exception as e:  # mistral-common raises several validation error types
            raise TokenizerError(f"cannot encode the chat: {e}") from e


@lru_cache(maxsize=None)
def load_tokenizer(version: str) -> Tokenizer:
    """Tokenizers are immutable and take a moment to load: one per version per process."""
    return Tokenizer(version)

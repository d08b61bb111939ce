"""A chat request's prompt: its messages encoded by the model's chat template.

mistral-common refuses a chat its template cannot encode with its own exceptions, written for users ("Conversation
must start with a user message or system message"): those messages reach the client. Anything else the tokenizer
raises (pydantic errors, a KeyError, a C++ cast error from its bindings) speaks of its internals: the client gets a
plain sentence, and the log one line naming the kind.
"""

from __future__ import annotations

import logging

from mistral_common.exceptions import MistralCommonException

from cluster.api.errors import APIError
from cluster.api.protocol import ChatMessage
from cluster.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The prompt's token ids; APIError(400) for a chat the template refuses."""
    try:
        return tokenizer.encode_chat([m.to_tokenizer() for m in messages])
    except TokenizerError as e:
        cause = e.__cause__
        if isinstance(cause, MistralCommonException):
            raise APIError(400, f"cannot encode the chat: {cause}", "messages") from None
        log.warning("the chat template refused a request with %s; answered with a generic 400", type(cause).__name__)
        raise APIError(400, "cannot encode the chat: the messages do not fit the model's chat template",
                       "messages") from None

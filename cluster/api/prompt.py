"""A chat request's prompt: its messages (and the tools it offers) encoded by the model's chat template.

Client tool-call ids (OpenAI's `call_...`) become the model's 9-alphanumeric ids (`model_tool_id`, the same map in
every request), so a conversation holding a client's tool calls encodes, and a call and its result keep their link.

mistral-common refuses a chat its template cannot encode with its own exceptions, written for users ("Conversation
must start with a user message or system message"): those messages reach the client. Anything else the tokenizer
raises (pydantic errors, a KeyError, a C++ cast error from its bindings) speaks of its internals: the client gets a
plain sentence, and the log one line naming the kind.
"""

from __future__ import annotations

import logging
from typing import Any

from mistral_common.exceptions import MistralCommonException

from cluster.api.errors import APIError
from cluster.api.protocol import ChatMessage
from cluster.api.tool_calls import model_tool_id
from cluster.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Tokenizer, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
                  ) -> list[int]:
    """The prompt's token ids; APIError(400) for a chat the template refuses."""
    try:
        return tokenizer.encode_chat([m.to_tokenizer(model_tool_id) for m in messages], tools)
    except TokenizerError as e:
        cause = e.__cause__
        if isinstance(cause, MistralCommonException):
            raise APIError(400, f"cannot encode the chat: {cause}", "messages") from None
        log.warning("the chat template refused a request with %s; answered with a generic 400", type(cause).__name__)
        raise APIError(400, "cannot encode the chat: the messages do not fit the model's chat template",
                       "messages") from None

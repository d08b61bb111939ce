"""OpenAI error JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status it belongs to."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

RETRY_AFTER_S = 5  # what a 429 or 503 tells clients to wait: an expert shard restarts in seconds
MAX_MESSAGE_CHARS = 2000  # a message quoting a client's huge input is cut here
MAX_PROBLEMS = 5  # of a request's validation errors, the first ones named

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          431: "invalid_request_error",
          503: "service_unavailable_error"}
_RETRY_LATER = (429, 503)
_CLOSE = (408, 413, 431)  # answered before the body was read: the connection cannot be reused
_TAGGED_UNIONS = {"response_format"}  # request fields whose pydantic error locations carry the union's tag

# Pydantic's words for these name our model classes ("instance of ChatMessage"); clients see JSON's.
_MESSAGES = {"model_type": "Input should be a JSON object", "model_attributes_type": "Input should be a JSON object",
             "dict_type": "Input should be a JSON object",
             "union_tag_not_found": "Input should be an object with a \"type\" field",
             "union_tag_invalid": "Input should have a known \"type\""}


class APIError(Exception):
    """An error the API answers with; raised in handlers and turned into a response by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        message, param = _cut(message), param and _cut(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.status in _RETRY_LATER:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if self.status in _CLOSE:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return APIError(status, message, param, code).response()


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming the bad fields, e.g. "temperature: Input should be less than or equal to 2"."""
    problems, params = [], []
    for err in e.errors(include_url=False, include_input=False, include_context=False)[:MAX_PROBLEMS]:
        param = _param(err["loc"])
        message = _MESSAGES.get(err["type"], err["msg"].removeprefix("Value error, "))
        problems.append(f"{param}: {message}" if param else message)
        params.append(param)
    if e.error_count() > MAX_PROBLEMS:
        problems.append(f"and {e.error_count() - MAX_PROBLEMS} more")
    return APIError(400, "; ".join(problems) or "invalid request", next(iter(params), "") or None)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union-branch names and the tags of discriminated
    unions (('response_format', 'json_schema', 'json_schema', 'name') -> 'response_format.json_schema.name') are
    left out."""
    out = ""
    tag_next = False
    for part in loc:
        if tag_next:
            tag_next = False
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_branch(part):
            out += f".{part}" if out else part
            tag_next = part in _TAGGED_UNIONS
    return out


def _is_union_branch(part: str) -> bool:
    # Pydantic names the member of a union it tried: 'str', 'list[TextPart]', 'function-after[...]'.
    return part in ("str", "int", "float", "bool", "none") or "[" in part


class AccountError(APIError):
    """An APIError with OpenAI's `type` for accounts (it differs from the status's usual one) and extra headers."""

    def __init__(self, status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(status, message, param, code)
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        body = super().body()
        body["error"]["type"] = self.kind
        return body

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers.update(self.headers)
        return response

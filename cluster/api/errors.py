"""OpenAI error JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status it belongs to."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

RETRY_AFTER_S = 5  # what a 503 tells clients to wait: an expert shard restarts in seconds

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """An error the API answers with; raised in handlers and turned into a response by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return APIError(status, message, param, code).response()


def validation_error(e: ValidationError) -> APIError:
    """A 400 naming each bad field, e.g. "temperature: Input should be less than or equal to 2"."""
    problems, params = [], []
    for err in e.errors(include_url=False):
        param = _param(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{param}: {message}" if param else message)
        params.append(param)
    return APIError(400, "; ".join(problems) or "invalid request", next(iter(params), "") or None)


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union-branch names are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_union_branch(part):
            out += f".{part}" if out else part
    return out


def _is_union_branch(part: str) -> bool:
    # Pydantic names the member of a union it tried: 'str', 'list[TextPart]', 'function-after[...]'.
    return part in ("str", "int", "float", "bool", "none") or "[" in part

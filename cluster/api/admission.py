"""Requests the API refuses from their head alone: a POST to a generation route while the backend is full.

The routes refuse such a request themselves before reading its body (`streaming.serve_generation`); a server that
parses heads itself (`cluster.serve.http_server`) asks `head_refusal` as each head completes and answers at once,
before the request costs a task, the middleware and the router: under a flood of requests, refusals are most of
them.
"""

from __future__ import annotations

from typing import Callable

from starlette.applications import Starlette
from starlette.routing import Route

from cluster.api.backend import GenerationBackend
from cluster.api.errors import APIError

HeadRefusal = Callable[[str, str], "APIError | None"]  # (method, path) -> the refusal, or None: serve it


def head_refusal(api: Starlette, backend: GenerationBackend) -> HeadRefusal:
    """For (method, path) of a request head: the 429 a POST to one of `api`'s POST routes gets while `backend` is
    overloaded, else None."""
    generation_paths = frozenset(route.path for route in api.routes
                                 if isinstance(route, Route) and "POST" in (route.methods or ()))

    def refusal(method: str, path: str) -> APIError | None:
        if method != "POST" or path not in generation_paths:
            return None
        reason = backend.overloaded()
        return None if reason is None else APIError(429, reason)

    return refusal

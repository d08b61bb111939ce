"""Admission from a request's head: a server that parses heads itself (`cluster.serve.http_server`) refuses a
generation request there, before it costs a task, the middleware, its body or its tokenization.

The engine counts a request once it is admitted, after its body was read and its chat encoded; under a flood,
hundreds of requests would pass its check while the first ones are still being encoded, and each would then be
refused only after all that work. So `HeadAdmission` counts generation requests from the moment their head passes
until their response has ended (`enter`/`leave`), and refuses a new one while that count has reached the engine's
capacity (`max_num_seqs` + `max_waiting`: a request is at least one sequence) or the backend says it is full. Under a
flood the first `capacity` requests go on and every other one is answered 429 as its head arrives.

The routes still check the backend themselves (`streaming.serve_generation`): that is the check on Ray, where Serve's
proxy parses the heads, and the engine decides last, by sequences.
"""

from __future__ import annotations

from typing import Callable

from starlette.applications import Starlette
from starlette.routing import Route

from cluster.api.backend import GenerationBackend
from cluster.api.errors import APIError


class HeadAdmission:
    """The generation requests between their head and the end of their response, against the engine's capacity.
    Event-loop thread only."""

    def __init__(self, api: Starlette, backend: GenerationBackend, capacity: int,
                 on_refused: Callable[[int], None] = lambda status: None):
        self.generation_paths = frozenset(route.path for route in api.routes
                                          if isinstance(route, Route) and "POST" in (route.methods or ()))
        self.backend = backend
        self.capacity = capacity
        self.on_refused = on_refused  # counts a refusal this class makes itself (the backend counts its own)
        self.active = 0

    def is_generation(self, method: str, path: str) -> bool:
        return method == "POST" and path in self.generation_paths

    def enter(self) -> APIError | None:
        """Count a generation request in (call `leave` once when its response has ended), or the 429 refusing it."""
        reason = self.backend.overloaded()
        if reason is None and self.active >= self.capacity:
            self.on_refused(429)
            reason = (f"the server is at capacity: {self.active} requests are in progress, the most it admits at once "
                      f"({self.capacity}); retry later")
        if reason is not None:
            return APIError(429, reason)
        self.active += 1
        return None

    def leave(self) -> None:
        self.active -= 1

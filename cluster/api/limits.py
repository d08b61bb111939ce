"""What the HTTP API accepts from one request: body size, how long its head and body may take to arrive, how long
its chat may take to tokenize, and how many choices it may hold; and the connections one client, and all of them,
may hold. Bounds that keep one client from stalling the server or holding a connection. The connection bounds are
the single-process server's (`cluster.serve.http_server`); on Ray, Serve's proxy holds the connections."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.config import EngineConfig

MiB = 1024 * 1024


@dataclass(frozen=True)
class APILimits:
    max_body_bytes: int = 4 * MiB  # larger bodies get 413 before they are read
    body_timeout_s: float = 30.0  # a body not fully received by then gets 408 and the connection is closed
    tokenize_budget_s: float = 10.0  # a chat not encoded this long after a thread took it up gets 400; one no thread
    # took up by then, 503
    tokenize_threads: int = 2  # chats are encoded off the event loop, this many at a time in each lane (bodies up to
    # 64 KiB in one, larger ones in the other: `cluster.api.workers`)
    # Choices one request may hold, over all its prompts (ServeArgs.max_n, which the engine also enforces on each
    # prompt's n): a request of several prompts never occupies more of the engine than one request may.
    max_n: int = EngineConfig.max_n
    header_timeout_s: float = 10.0  # a request head not complete by then (from the connection's start or the last
    # response's end) gets 408 and the connection is closed
    max_connections: int = 4096  # open connections in all; past it a new one gets 503 and is closed
    max_connections_per_client: int = 128  # open connections from one address (0: no cap); past it, 429

    def __post_init__(self) -> None:
        checks = [(self.max_body_bytes >= 1, f"max_body_bytes must be >= 1, got {self.max_body_bytes}"),
                  (self.body_timeout_s > 0, f"body_timeout_s must be > 0, got {self.body_timeout_s}"),
                  (self.tokenize_budget_s > 0, f"tokenize_budget_s must be > 0, got {self.tokenize_budget_s}"),
                  (self.tokenize_threads >= 1, f"tokenize_threads must be >= 1, got {self.tokenize_threads}"),
                  (self.max_n >= 1, f"max_n must be >= 1, got {self.max_n}"),
                  (self.header_timeout_s > 0, f"header_timeout_s must be > 0, got {self.header_timeout_s}"),
                  (self.max_connections >= 1, f"max_connections must be >= 1, got {self.max_connections}"),
                  (self.max_connections_per_client >= 0,
                   f"max_connections_per_client must be >= 0, got {self.max_connections_per_client}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

"""`moe-cluster serve --no-ray`: the same HTTP API and engine in one process, experts behind the in-process
transport, served by uvicorn through `cluster.serve.http_server` (head deadline, connection caps, 429s answered as
a request's head arrives). SIGTERM or SIGINT drains it (`cluster.serve.drain`) for `shutdown_grace_s`, then it
exits 0; a second signal stops it at once."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from cluster.api.admission import HeadAdmission
from cluster.engine.async_engine import AsyncEngine
from cluster.metrics.engine_metrics import single_process_metrics
from cluster.serve.api_app import served_api
from cluster.serve.drain import Drain
from cluster.serve.engine_backend import EngineBackend
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.http_server import allow_open_files, uvicorn_config
from cluster.serve.resolved import ResolvedArgs

log = logging.getLogger(__name__)


def build_standalone_app(resolved: ResolvedArgs) -> tuple[Drain, AsyncEngine]:
    app, engine, _ = _build(resolved)
    return app, engine


def _build(resolved: ResolvedArgs) -> tuple[Drain, AsyncEngine, HeadAdmission]:
    """The app, its engine, and the admission that counts its generation requests from their heads."""
    if resolved.layout.data_parallel:
        raise ValueError(f"attention_ranks={resolved.layout.attention_ranks} runs each rank as a Ray actor: serve it "
                         "on Ray (without --no-ray)")
    engine = AsyncEngine(lambda: build_engine(resolved, in_process_executor(resolved)))
    metrics = single_process_metrics(resolved.model_name, engine)
    backend = EngineBackend(engine, resolved.moe_kernel, metrics)
    app = served_api(resolved, backend)
    capacity = resolved.engine.max_num_seqs + resolved.engine.max_waiting  # sequences; a request is one or more
    return app, engine, HeadAdmission(app.app, backend, capacity, metrics.requests.refused)


class _DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains the app before it stops (uvicorn's own handling would close the
    socket at once and re-raise the signal on the way out, ending the process with that signal, not 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float):
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self._signalled = False
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self._signalled = True
        log.info("%s: draining for up to %gs", signal.Signals(sig).name, self.grace_s)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_draining, loop)

    def _start_draining(self, loop: asyncio.AbstractEventLoop) -> None:
        self._draining = loop.create_task(self._drain())

    async def _drain(self) -> None:
        await self.drain.close(self.grace_s)
        self.should_exit = True


def standalone_config(resolved: ResolvedArgs, host: str, port: int) -> tuple[uvicorn.Config, Drain, AsyncEngine]:
    """The server's uvicorn config (its protocol guarded by `cluster.serve.http_server` under `resolved.api`), the
    app it serves and the engine behind it."""
    app, engine, admission = _build(resolved)
    # lifespan on: the ledger opens (and releases expired reservations) before the first request
    config = uvicorn_config(app, host, port, resolved.api, admission, log_level="warning",
                            timeout_graceful_shutdown=5, lifespan="on")
    return config, app, engine


def run_standalone(resolved: ResolvedArgs, host: str, port: int) -> None:
    config, app, engine = standalone_config(resolved, host, port)
    allow_open_files(resolved.api.max_connections)
    server = _DrainingServer(config, app, resolved.args.shutdown_grace_s)
    log.info("serving %s on http://%s:%d/v1 (single process)", resolved.model_name, host, port)
    try:
        server.run()
    finally:
        engine.shutdown()
    log.info("stopped")

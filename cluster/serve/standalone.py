"""`moe-cluster serve --no-ray`: the same HTTP API and engine in one process, experts behind the in-process
transport. SIGTERM or SIGINT drains it (`cluster.serve.drain`) for `shutdown_grace_s`, then it exits 0; a second
signal stops it at once."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from cluster.engine.async_engine import AsyncEngine
from cluster.metrics.engine_metrics import single_process_metrics
from cluster.serve.api_app import served_api
from cluster.serve.drain import Drain
from cluster.serve.engine_backend import EngineBackend
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import ResolvedArgs

log = logging.getLogger(__name__)


def build_standalone_app(resolved: ResolvedArgs) -> tuple[Drain, AsyncEngine]:
    engine = AsyncEngine(lambda: build_engine(resolved, in_process_executor(resolved)))
    metrics = single_process_metrics(resolved.model_name, engine)
    return served_api(resolved, EngineBackend(engine, resolved.moe_kernel, metrics)), engine


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


def run_standalone(resolved: ResolvedArgs, host: str, port: int) -> None:
    app, engine = build_standalone_app(resolved)
    # lifespan on: the ledger opens (and releases expired reservations) before the first request
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="on")
    server = _DrainingServer(config, app, resolved.args.shutdown_grace_s)
    log.info("serving %s on http://%s:%d/v1 (single process)", resolved.model_name, host, port)
    try:
        server.run()
    finally:
        engine.shutdown()
    log.info("stopped")

"""The Ingress Serve deployment: the OpenAI HTTP API, generating through a streaming handle to the AttentionRouter."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.logs import configure_logging
from cluster.serve.api_app import reconfigure_api, served_api
from cluster.serve.args import ServeArgs
from cluster.serve.drain import Drain
from cluster.serve.live import INGRESS_SETTINGS, Applied, apply_user_config, user_config
from cluster.serve.resolved import ResolvedArgs, api_limits, resolve

log = logging.getLogger(__name__)

_PROBE_PERIOD_S = 0.1
_PROBE_TIMEOUT_S = 0.4  # a live replica answers a health call in milliseconds
_PROBE_MISSES = 2  # consecutive probes unanswered before requests are refused (within a second of a replica's loss)
_HEALTH_PROBES = 3  # router replicas `/health` asks before it reports the last one's trouble


class RouterBackend:
    """A `GenerationBackend` over the AttentionRouter deployment; a lost replica becomes 503 outputs.

    While Serve restarts a replica it holds new requests until one is back, which a client would see as a hang. So
    a watcher probes the router's health every `_PROBE_PERIOD_S`; once `_PROBE_MISSES` probes in a row get no answer
    within `_PROBE_TIMEOUT_S`, new requests (and those still waiting for their first output) get 503 at once, and
    `/health` (which probes afresh) says so too.
    """

    def __init__(self, router: DeploymentHandle, settings_refused: Callable[[], str | None] = lambda: None):
        self.router = router
        self.settings_refused = settings_refused  # the Ingress's refusal of a user_config, shown by /health
        self.streaming = router.options(stream=True)
        self.unreachable: str | None = None  # why no replica answered the last probe; None while one does
        self._watcher: asyncio.Task | None = None

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        self._watch()
        if self.unreachable is not None:
            for out in RequestOutput.errors(request_id, params.n, self.unreachable, 503):
                yield out
            return
        responses = self.streaming.generate.remote(request_id, prompt, params, stream)
        batches = responses.__aiter__()  # each a list of outputs: one Serve message (cluster.serve.stream_batches)
        finished: set[int] = set()  # the choices that ended
        try:
            batch = await self._first(batches)
            while batch is not None:
                # A replica of the version before stream batches (a rolling update) yields outputs alone.
                for out in batch if isinstance(batch, list) else [batch]:
                    if out.finished:
                        finished.add(out.index)
                    yield out
                batch = await anext(batches, None)
        except Exception as e:  # the replica died, was replaced mid-request, or none is there
            log.warning("request %s lost its AttentionRouter replica: %s", request_id, e)
            for out in RequestOutput.errors(request_id, params.n, "the serving unit went away; retry", 503):
                if out.index not in finished:  # a choice that already ended keeps its end
                    yield out
        finally:
            responses.cancel()  # a client that left aborts the request in the engine

    async def _first(self, batches: AsyncIterator[list[RequestOutput]]) -> list[RequestOutput]:
        """The first batch, as long as it takes (a long prefill, a queue), unless the probes find no replica."""
        first = asyncio.ensure_future(batches.__anext__())
        try:
            while not (await asyncio.wait({first}, timeout=_PROBE_PERIOD_S))[0]:
                if self.unreachable is not None:
                    raise ConnectionError(self.unreachable)
            return first.result()
        finally:
            if not first.done():  # refused, or this request was cancelled while it waited
                first.cancel()

    def overloaded(self) -> str | None:
        return None  # not known here without a hop: the AttentionRouter refuses with 429 itself

    async def health(self) -> Health:
        """The API's health: ok while some unit serves. Each probe reaches one AttentionRouter replica, Serve's
        choice, so a unit recovering beside healthy ones is asked past (up to `_HEALTH_PROBES` probes)."""
        self._watch()
        for _ in range(_HEALTH_PROBES):
            health = await self._probe()
            if health.ok:
                break
        refusal = self.settings_refused()
        if refusal is not None:
            health.stats["ingress_settings_refused"] = refusal
        return health

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        misses = 0
        while True:
            health = await self._probe()
            misses = misses + 1 if health.status == "unreachable" else 0
            # One slow answer (a busy replica) is not a lost one: only consecutive misses refuse requests.
            self.unreachable = health.detail if misses >= _PROBE_MISSES else None
            await asyncio.sleep(_PROBE_PERIOD_S)

    async def _probe(self) -> Health:
        try:
            return await asyncio.wait_for(self._ask_health(), _PROBE_TIMEOUT_S)
        except Exception as e:  # a timeout: no replica (Serve is restarting it); else the call itself failed
            reason = "is restarting" if isinstance(e, asyncio.TimeoutError) else f"is unreachable: {e}"
            return Health("unreachable", f"the AttentionRouter {reason}; retry")

    async def _ask_health(self) -> Health:
        return await self.router.health.remote()


@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, args: ServeArgs):
        configure_logging()  # this replica's process: its records reach the driver through Ray's log forwarding
        self.router = router
        self.args = args  # as the app was built: a user_config applies over these
        self.resolved: ResolvedArgs = resolve(args)  # config.json is read here, on the replica's node
        self.drainer: Drain | None = None  # (not `app`: Serve's ingress wrapper owns that name)
        self.applied = Applied(args, None)  # the live settings in effect (cluster.serve.live)
        self._draining: asyncio.Task | None = None
        self._in_flight = 0

    def __serve_build_asgi_app__(self) -> Drain:
        self.drainer = served_api(self.resolved, RouterBackend(self.router, lambda: self.applied.refusal))
        return self.drainer

    async def reconfigure(self, config: dict | None) -> None:
        """Serve's user_config (cluster.serve.live.INGRESS_SETTINGS): prices and request limits, applied to the
        running API on its event loop, between requests' steps; requests already started keep their price. A refused
        one changes nothing, and /health says why."""
        self.applied = apply_user_config(self.args, self.applied.args, INGRESS_SETTINGS, config, "Ingress")
        args = self.applied.args
        self.resolved = dataclasses.replace(self.resolved, args=args, api=api_limits(args))
        if self.drainer is not None:
            reconfigure_api(self.drainer, self.resolved)
        log.info("Ingress settings: %s", user_config(args, INGRESS_SETTINGS))

    async def begin_drain(self, grace_s: float) -> tuple[str, int]:
        """Stop admitting now; in the background let the requests in flight finish for `grace_s` and cut the rest
        (see `Drain.close`). -> (this replica's id, the requests in flight when it was first asked). The driver
        asks every replica before it shuts Serve down; asking again changes nothing."""
        assert self.drainer is not None
        if self._draining is None:
            self._in_flight = self.drainer.in_flight
            self.drainer.stop_admitting()  # before this answers: the driver says so once every replica has
            self._draining = asyncio.get_running_loop().create_task(self.drainer.close(grace_s))
        return self._replica_id(), self._in_flight

    async def drained(self) -> tuple[str, bool]:
        """(this replica's id, whether its drain has ended)."""
        return self._replica_id(), self._draining is not None and self._draining.done()

    @staticmethod
    def _replica_id() -> str:
        return serve.get_replica_context().replica_id.unique_id

"""The AttentionRouter Serve deployment: one replica owns the engine and drives its unit's expert shards.

Serve handles carry whole requests to it (token ids in, a stream of `RequestOutput` deltas out); per-layer tokens
go to the shards over the unit's channel, never through Serve.
"""

from __future__ import annotations

import logging
import os
from typing import AsyncIterator

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.logs import configure_logging
from cluster.metrics.engine_metrics import replica_metrics
from cluster.serve.args import ServeArgs
from cluster.serve.engine_backend import EngineBackend, final_outputs
from cluster.serve.engine_builder import build_engine
from cluster.serve.live import ROUTER_SETTINGS, reconfigured, user_config
from cluster.serve.resolved import resolve_planned

log = logging.getLogger(__name__)


class AttentionRouter:
    def __init__(self, args: ServeArgs):
        from cluster.serve.unit import ShardedUnit  # needs Ray: imported where Ray runs

        configure_logging()  # this replica's process: its records reach the driver through Ray's log forwarding
        self.args = args  # as the app was built: a user_config applies over these
        resolved = resolve_planned(args)  # config.json is read here, on the replica's node
        self.unit: ShardedUnit | None = None

        def factory():
            if resolved.num_shards:
                self.unit = ShardedUnit(resolved)
            return build_engine(resolved, self.unit.executor if self.unit else None)

        self.engine = AsyncEngine(factory)  # shards, channel and engine are all built on the engine thread
        if self.unit is not None:
            self.unit.supervise(self.engine.call)
        self.metrics = replica_metrics(resolved.model_name, self.engine, self._unit_health)
        self.backend = EngineBackend(self.engine, resolved.moe_kernel, self.metrics)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Deltas as the engine makes them; with `stream=False` only each choice's merged final output, which
        saves a Serve message per token."""
        health = self._unit_health()
        if not health.ok:
            message = f"the serving unit is {health.status}: {health.detail}"
            self.metrics.requests.refused(503)
            for out in RequestOutput.errors(request_id, params.n, message, 503):
                yield out
            return
        outputs = self.backend.generate(request_id, prompt, params)
        async for out in (outputs if stream else final_outputs(outputs)):
            yield out

    def reconfigure(self, config: dict | None) -> None:
        """Serve's user_config (cluster.serve.live.ROUTER_SETTINGS): the engine's admission, changed while it runs."""
        args = reconfigured(self.args, ROUTER_SETTINGS, config)
        self.engine.max_waiting = args.max_waiting
        log.info("AttentionRouter settings: %s", user_config(args, ROUTER_SETTINGS))

    async def health(self) -> Health:
        health = self._unit_health()
        health.stats.update((await self.backend.health()).stats)
        health.stats["pid"] = os.getpid()
        return health

    def shard_info(self) -> list[dict]:
        return self.unit.shard_info() if self.unit else []

    def check_health(self) -> None:
        """Serve's probe: only a unit that could not bring its shards back is unhealthy (Serve then replaces it)."""
        health = self._unit_health()
        if health.status == "failed":
            raise RuntimeError(health.detail)

    def _unit_health(self) -> Health:
        return self.unit.health() if self.unit else Health()

    def __del__(self) -> None:
        try:
            self.engine.shutdown()
            if self.unit is not None:
                self.unit.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

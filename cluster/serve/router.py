"""The AttentionRouter Serve deployment: one replica per serving unit. It owns the engine and drives the unit's
expert shards, or (data-parallel attention, `attention_ranks` > 1) spreads its requests over the unit's attention
ranks (`cluster.serve.dp_unit`).

Serve handles carry whole requests to it (token ids in, a stream of `RequestOutput` deltas out); per-layer tokens
go to the shards over the unit's channel, or between the ranks over their group, never through Serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import aclosing
from typing import AsyncIterator

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.kernels.triton_cache import usable_triton_cache
from cluster.logs import configure_logging
from cluster.metrics.engine_metrics import replica_metrics
from cluster.metrics.recorder import RequestMetrics
from cluster.serve.args import ServeArgs
from cluster.serve.engine_backend import EngineBackend, final_outputs
from cluster.serve.engine_builder import build_engine
from cluster.serve.live import ROUTER_SETTINGS, Applied, apply_user_config, user_config
from cluster.serve.resolved import resolve_planned
from cluster.serve.stream_batches import batched

log = logging.getLogger(__name__)


class AttentionRouter:
    def __init__(self, args: ServeArgs):
        from cluster.serve.dp_unit import DataParallelUnit  # need Ray: imported where Ray runs
        from cluster.serve.unit import ShardedUnit

        configure_logging()  # this replica's process: its records reach the driver through Ray's log forwarding
        usable_triton_cache()  # before any kernel compiles here
        self.args = args  # as the app was built: a user_config applies over these
        self.applied = Applied(args, None)  # the live settings in effect (cluster.serve.live)
        resolved = resolve_planned(args)  # config.json is read here, on the replica's node
        self.ranks: DataParallelUnit | None = None
        self.unit: ShardedUnit | DataParallelUnit | None = None
        if resolved.layout.data_parallel:  # the ranks hold the engines (and record their metrics): none here
            from cluster.metrics.ray_sink import RaySink

            self.unit = self.ranks = DataParallelUnit(resolved)
            self.refusals = RequestMetrics(RaySink(), resolved.model_name)  # what this replica refuses itself
            return

        def factory():
            if resolved.num_shards:
                self.unit = ShardedUnit(resolved)
            return build_engine(resolved, self.unit.executor if self.unit else None)

        self.engine = AsyncEngine(factory)  # shards, channel and engine are all built on the engine thread
        if self.unit is not None:
            self.unit.supervise(self.engine.call)
        self.metrics = replica_metrics(resolved.model_name, self.engine, self._unit_health)
        self.refusals = self.metrics.requests
        self.backend = EngineBackend(self.engine, resolved.moe_kernel, self.metrics)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[list[RequestOutput]]:
        """Deltas as the engine makes them, in batches (one Serve message each: cluster.serve.stream_batches);
        with `stream=False` only each choice's merged final output."""
        health = self._unit_health()
        if not health.ok:
            message = f"the serving unit is {health.status}: {health.detail}"
            self.refusals.refused(503)
            yield RequestOutput.errors(request_id, params.n, message, 503)
            return
        interval_s = self.applied.args.stream_interval_s
        if self.ranks is not None:
            batches = self.ranks.generate(request_id, prompt, params, stream, interval_s)
        else:
            outputs = self.backend.generate(request_id, prompt, params)
            batches = batched(outputs if stream else final_outputs(outputs), interval_s)
        async with aclosing(batches):
            async for batch in batches:
                yield batch

    async def reconfigure(self, config: dict | None) -> None:
        """Serve's user_config (cluster.serve.live.ROUTER_SETTINGS): the engine's admission and the streams'
        batching interval, changed while it runs (a refused one changes nothing, and /health says why)."""
        self.applied = apply_user_config(self.args, self.applied.args, ROUTER_SETTINGS, config, "AttentionRouter")
        if self.ranks is not None:
            await asyncio.to_thread(self.ranks.set_max_waiting, self.applied.args.max_waiting)
        else:
            self.engine.max_waiting = self.applied.args.max_waiting
        log.info("AttentionRouter settings: %s", user_config(self.applied.args, ROUTER_SETTINGS))

    async def health(self) -> Health:
        health = self._unit_health()
        stats = await self.ranks.stats() if self.ranks is not None else (await self.backend.health()).stats
        health.stats.update(stats)
        health.stats["pid"] = os.getpid()
        applied = self.applied
        health.stats.update(user_config(applied.args, ROUTER_SETTINGS))
        if applied.refusal is not None:
            health.stats["settings_refused"] = applied.refusal
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
            if self.ranks is None:
                self.engine.shutdown()
            if self.unit is not None:
                self.unit.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

"""`EngineBackend`: the API's `GenerationBackend` over an `AsyncEngine` in this process (the single process, and
inside each AttentionRouter replica), with the engine's metrics recorded on the way out."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import AsyncIterator

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.outputs import Refusal, RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.metrics.engine_metrics import EngineMetrics


class EngineBackend:
    """An `AsyncEngine` in this process (single-process mode, and inside the AttentionRouter replica).

    With `metrics`, each admitted request's outputs are timed and counted on their way out (`cluster.metrics`), and
    `metrics_text` serves them where this process exposes them itself (single-process mode)."""

    def __init__(self, engine: AsyncEngine, moe_kernel: str | None = None, metrics: EngineMetrics | None = None):
        self.engine = engine
        self.moe_kernel = moe_kernel  # reported in health stats beside the engine's attention kernel
        self.metrics = metrics

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        try:
            deltas = await self.engine.add_request(request_id, prompt, params)
        except (Refusal, ValueError) as e:  # RequestError and bad parameters (400), OverloadedError (429)
            refused = RequestOutput.refused(request_id, params.n, e)
            if self.metrics:
                self.metrics.requests.refused(refused[0].error_status)
            for out in refused:
                yield out
            return
        timer = self.metrics.requests.request(len(prompt), params, arrival) if self.metrics else None
        async with aclosing(deltas):  # a consumer that stops early releases the request's admission at once
            try:
                async for out in deltas:
                    if timer is not None:
                        timer.output(out)
                    yield out
            finally:
                if timer is not None:
                    timer.close()

    async def metrics_text(self) -> tuple[bytes, str] | None:
        """The Prometheus text of this process's metrics and its content type, or None where they are exported
        otherwise (Ray)."""
        return await asyncio.to_thread(self.metrics.render) if self.metrics else None

    def overloaded(self) -> str | None:
        refusal = self.engine.overloaded()
        if refusal is None:
            return None
        if self.metrics:  # the API refuses the request when this answers, before `generate`
            self.metrics.requests.refused(refusal.status)
        return str(refusal)

    async def health(self) -> Health:
        stats = self.engine.engine.stats().as_dict()
        stats["in_flight"] = self.engine.in_flight  # admitted sequences, as admission counts them
        if self.moe_kernel:
            stats["moe_kernel"] = self.moe_kernel
        return Health(stats=stats)


async def final_outputs(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Each choice's deltas merged into one output, yielded when that choice finishes (errors at once)."""
    pending: dict[int, RequestOutput] = {}
    async for out in outputs:
        earlier = pending.pop(out.index, None)
        merged = out if earlier is None else earlier.merged(out)
        if merged.finished:
            yield merged
        else:
            pending[out.index] = merged

"""What the HTTP API generates with: an in-process engine, or an AttentionRouter behind a Serve handle.

Contract: `generate` never raises for a request's own problems. A refused request (bad input, too long) or an
unavailable unit yields one `RequestOutput` per choice (`RequestOutput.errors`) with `finish_reason="error"`,
`error` and `error_status` (400, 503...); the API turns those into OpenAI error JSON with that status.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.serve.health import Health


class GenerationBackend(Protocol):
    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 stream: bool = True) -> AsyncIterator[RequestOutput]:
        """The request's deltas (every choice) until each choice has its finish_reason; see the module contract.

        With `stream=False` a backend may merge each choice's deltas into its final output (fewer hops)."""
        ...

    async def health(self) -> Health:
        ...


class EngineBackend:
    """An `AsyncEngine` in this process (single-process mode, and inside the AttentionRouter replica)."""

    def __init__(self, engine: AsyncEngine, moe_kernel: str | None = None):
        self.engine = engine
        self.moe_kernel = moe_kernel  # reported in health stats beside the engine's attention kernel

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        try:
            deltas = await self.engine.add_request(request_id, prompt, params)
        except ValueError as e:  # RequestError and bad parameters
            for out in RequestOutput.errors(request_id, params.n, str(e), 400):
                yield out
            return
        async for out in deltas:
            yield out

    async def health(self) -> Health:
        stats = self.engine.engine.stats()
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

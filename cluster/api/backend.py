"""What the HTTP API generates with: the contract. `cluster.serve` implements it (an engine in this process, or an
AttentionRouter behind a Serve handle).

Contract: `generate` never raises for a request's own problems. A refused request (400 bad input or too long, 429
the engine is full) or an unavailable unit (503) yields one `RequestOutput` per choice (`RequestOutput.errors`) with
`finish_reason="error"`, `error` and `error_status`; the API turns those into OpenAI error JSON with that status.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health


class GenerationBackend(Protocol):
    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 stream: bool = True) -> AsyncIterator[RequestOutput]:
        """The request's deltas (every choice) until each choice has its finish_reason; see the module contract.

        With `stream=False` a backend may merge each choice's deltas into its final output (fewer hops)."""
        ...

    def overloaded(self) -> str | None:
        """Why a request arriving now would be refused with 429 whatever it asks, or None (also when the backend
        cannot tell cheaply: `generate` refuses it then). The API may ask before it reads and tokenizes a request."""
        ...

    async def health(self) -> Health:
        ...

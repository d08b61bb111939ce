"""The Ingress Serve deployment: the OpenAI HTTP API, generating through a streaming handle to the AttentionRouter."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.api.server import build_api
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.serve.health import Health
from cluster.serve.resolved import ResolvedArgs
from cluster.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class RouterBackend:
    """A `GenerationBackend` over the AttentionRouter deployment; a lost replica becomes 503 outputs."""

    def __init__(self, router: DeploymentHandle):
        self.router = router
        self.streaming = router.options(stream=True)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        responses = self.streaming.generate.remote(request_id, prompt, params, stream)
        finished = 0
        try:
            async for out in responses:
                finished += out.finished
                yield out
        except Exception as e:  # the replica died or was replaced mid-request
            log.warning("request %s lost its AttentionRouter replica: %s", request_id, e)
            if finished < params.n:
                for out in RequestOutput.errors(request_id, params.n, "the serving unit went away; retry", 503):
                    yield out
        finally:
            responses.cancel()  # a client that left aborts the request in the engine

    async def health(self) -> Health:
        try:
            return await self.router.health.remote()
        except Exception as e:
            return Health("failed", f"the AttentionRouter is unreachable: {e}")


@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, resolved: ResolvedArgs):
        self.router = router
        self.resolved = resolved

    def __serve_build_asgi_app__(self):
        r = self.resolved
        return build_api(RouterBackend(self.router), load_tokenizer(r.tokenizer_version), r.model_name,
                         r.config.max_position_embeddings, r.sampling)

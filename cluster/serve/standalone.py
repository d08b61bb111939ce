"""`moe-cluster serve --no-ray`: the same HTTP API and engine in one process, experts behind the in-process
transport."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette

from cluster.api.backend import EngineBackend
from cluster.api.server import build_api
from cluster.engine.async_engine import AsyncEngine
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import ResolvedArgs
from cluster.tokenizer import load_tokenizer


def build_standalone_app(resolved: ResolvedArgs) -> tuple[Starlette, AsyncEngine]:
    engine = AsyncEngine(lambda: build_engine(resolved, in_process_executor(resolved)))
    backend = EngineBackend(engine, resolved.moe_backend if resolved.num_shards else None)
    app = build_api(backend, load_tokenizer(resolved.tokenizer_version), resolved.model_name,
                    resolved.config.max_position_embeddings, resolved.sampling)
    return app, engine


def run_standalone(resolved: ResolvedArgs, host: str, port: int) -> None:
    app, engine = build_standalone_app(resolved)
    print(f"serving {resolved.model_name} on http://{host}:{port}/v1 (single process)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()

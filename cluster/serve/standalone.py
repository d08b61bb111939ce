"""`moe-cluster serve --no-ray`: the same HTTP API and engine in one process, experts behind the in-process
transport."""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette

from cluster.api.backend import EngineBackend
from cluster.api.protocol import default_temperature
from cluster.api.server import build_api
from cluster.config import ModelConfig
from cluster.engine.async_engine import AsyncEngine
from cluster.serve.args import ServeArgs
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version


def build_standalone_app(args: ServeArgs) -> tuple[Starlette, AsyncEngine]:
    device = args.resolved_device()
    engine = AsyncEngine(lambda: build_engine(args, device, in_process_executor(args, device)))
    config = ModelConfig.from_file(args.model_dir())
    tok = load_tokenizer(resolve_tokenizer_version(config, args.tokenizer))
    app = build_api(EngineBackend(engine), tok, args.model_name(), config.max_position_embeddings,
                    default_temperature=default_temperature(config))
    return app, engine


def run_standalone(args: ServeArgs, host: str, port: int) -> None:
    app, engine = build_standalone_app(args)
    print(f"serving {args.model_name()} on http://{host}:{port}/v1 (single process)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()

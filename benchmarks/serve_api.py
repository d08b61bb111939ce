"""The HTTP API on this device under load (the GPU check's `serve_api`): `moe-cluster serve --no-ray` started in a
subprocess with random weights, driven by concurrent streaming chat requests, against the engine alone on the same
workload (the same prompts as token ids, the same max_tokens, greedy, EOS ignored, the same concurrency), built in
this process by the same code from the same command line. Goal: API output tokens/s >= 0.9x the engine's.

Both are warmed by a short round first; the engine runs first and is gone before the server starts. The server is
waited for on /health (bounded, with progress lines) and always stopped; on a failure the error carries the tail of
its log. Per side: output tokens/s, TTFT, and the gaps between content chunks (API) or outputs (engine), p50/p99.
Checked: every stream ends with [DONE] and usage, its prompt is the token count the engine was given, and it made
exactly max_tokens tokens.

On the GPU machine the server needs the carried wheels (benchmarks/gpu_wheels.sh); the dry run serves `tiny` on
the CPU with a tiny load.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from cluster.cli import build_parser, serve_settings
from cluster.engine.async_engine import AsyncEngine
from cluster.parallel.channel import free_port
from cluster.serve.engine_builder import build_engine, in_process_executor
from cluster.serve.resolved import ResolvedArgs, resolve
from cluster.tokenizer import load_tokenizer
from engine import Result, run_engine
from tests.http import DONE, data_of

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.9  # API tokens/s over the engine's
HEALTH_TIMEOUT_S = 300.0
PROGRESS_S = 15.0
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Load:
    flags: tuple[str, ...]  # `moe-cluster serve` options, for the server and the engine alike
    requests: int
    concurrency: int
    words: tuple[int, int]  # prompt length in words, inclusive
    max_tokens: tuple[int, int]
    warm_up_tokens: int = 4
    server_env: tuple[tuple[str, str], ...] = ()


GPU_LOAD = Load(("--model", "mini", "--load-format", "random", "--kv-cache-bytes", "4GiB", "--max-num-seqs", "64"),
                requests=256, concurrency=64, words=(40, 200), max_tokens=(64, 256))
DRY_LOAD = Load(("--model", "tiny", "--load-format", "random", "--device", "cpu", "--dtype", "fp32",
                 "--moe-backend", "torch", "--attention-backend", "torch", "--kv-cache-bytes", "64MiB",
                 "--max-num-seqs", "4"), requests=4, concurrency=2, words=(5, 20), max_tokens=(3, 4),
                warm_up_tokens=2,
                # The server shares the CPU's cores with this client: a torch thread pool spinning over them would
                # make every step wait on the client's turn.
                server_env=(("OMP_NUM_THREADS", "1"),))


def chat_bodies(load: Load, model: str, seed: int = 0) -> list[dict]:
    """Streaming chat requests of random words (the weights are random too), greedy, exactly max_tokens long."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))

    def text() -> str:
        return " ".join(word() for _ in range(rng.randint(*load.words)))

    return [{"model": model, "messages": [{"role": "user", "content": text()}],
             "max_tokens": rng.randint(*load.max_tokens), "temperature": 0, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for _ in range(load.requests)]


def shortened(bodies: list[dict], max_tokens: int) -> list[dict]:
    return [{**b, "max_tokens": max_tokens} for b in bodies]


def token_requests(prompts: list[list[int]], bodies: list[dict]) -> list[tuple[list[int], int]]:
    """The engine's side of `bodies`: (prompt token ids, max_tokens)."""
    return [(p, b["max_tokens"]) for p, b in zip(prompts, bodies)]


def run(dry_run: bool, deadline: float = float("inf")) -> dict:
    load = DRY_LOAD if dry_run else GPU_LOAD
    argv = ["serve", "--no-ray", *load.flags]
    resolved = resolve(serve_settings(build_parser(argv).parse_args(argv)))
    bodies = chat_bodies(load, resolved.model_name)
    tokenizer = load_tokenizer(resolved.tokenizer_version)
    prompts = [tokenizer.encode_chat(b["messages"]) for b in bodies]
    warm = shortened(bodies[:load.concurrency], load.warm_up_tokens)

    engine = engine_alone(resolved, token_requests(prompts, bodies), token_requests(prompts, warm), load.concurrency)
    release_device_memory()
    with tempfile.TemporaryDirectory(prefix="serve-api-") as tmp:
        log = Path(tmp) / "server.log"
        try:
            with running_server(load, log, min(HEALTH_TIMEOUT_S, deadline - time.monotonic())) as (url, up_s):
                asyncio.run(api_run(url, warm, load.concurrency))
                api, usages = asyncio.run(api_run(url, bodies, load.concurrency))
        except Exception as e:
            raise RuntimeError(f"{e}\n--- server log tail ---\n{tail(log)}") from e
    return summary(load, bodies, prompts, engine, api, usages, up_s)


def engine_alone(resolved: ResolvedArgs, requests: list[tuple[list[int], int]],
                 warm: list[tuple[list[int], int]], concurrency: int) -> Result:
    """The server's engine (built as `moe-cluster serve --no-ray` builds it), driven in this process."""
    front = AsyncEngine(lambda: build_engine(resolved, in_process_executor(resolved)))
    try:
        run_engine(front, warm, concurrency)
        served, _ = run_engine(front, requests, concurrency)
    finally:
        front.shutdown()
    return served


def release_device_memory() -> None:
    """What this process no longer uses goes back to the device, for the server to take."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def running_server(load: Load, log: Path, timeout_s: float) -> Iterator[tuple[str, float]]:
    """`moe-cluster serve --no-ray` on a free port of 127.0.0.1 once /health answers: (its URL, seconds to start).
    Stopped (SIGTERM, then SIGKILL) however the block ends."""
    port = free_port("127.0.0.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **dict(load.server_env)}
    command = [sys.executable, "-m", "cluster.cli", "serve", "--no-ray", "--host", "127.0.0.1", "--port", str(port),
               "--shutdown-grace-s", "5", *load.flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, wait_healthy(process, url, timeout_s)
    finally:
        stop(process)


def wait_healthy(process: subprocess.Popen, url: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    said = t0
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before /health answered")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return round(time.monotonic() - t0, 1)
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - t0 > timeout_s:
            raise RuntimeError(f"/health did not answer within {timeout_s:.0f} s")
        if now - said >= PROGRESS_S:
            print(f"   waiting for the server's /health: {now - t0:.0f} s", flush=True)
            said = now
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


async def api_run(url: str, bodies: list[dict], concurrency: int) -> tuple[Result, list[dict | None]]:
    """`bodies` streamed with `concurrency` in flight: the run (output tokens from each stream's usage) and each
    stream's usage (None where the stream did not end with usage and [DONE])."""
    result = Result(f"API c={concurrency}", 0, 0.0)
    usages: list[dict | None] = [None] * len(bodies)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int, body: dict) -> None:
            async with gate:
                usages[i] = await stream_chat(client, body, result)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        result.seconds = time.perf_counter() - t0
    result.output_tokens = sum(u["completion_tokens"] for u in usages if u)
    return result, usages


async def stream_chat(client: httpx.AsyncClient, body: dict, result: Result) -> dict | None:
    """One streaming chat request; its content chunks' times go into `result`. Its usage if it ended whole."""
    start = time.perf_counter()
    last = usage = None
    done = False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            payload = data_of(line)
            if payload is None:
                continue
            if payload == DONE:
                done = True
                continue
            chunk = json.loads(payload)
            usage = chunk.get("usage") or usage
            if any(c["delta"].get("content") for c in chunk["choices"]):
                now = time.perf_counter()
                (result.ttft if last is None else result.itl).append(now - (start if last is None else last))
                last = now
    return usage if done else None


def summary(load: Load, bodies: list[dict], prompts: list[list[int]], engine: Result, api: Result,
            usages: list[dict | None], up_s: float) -> dict:
    whole = [u is not None and u["completion_tokens"] == b["max_tokens"] and u["prompt_tokens"] == len(p)
             for u, b, p in zip(usages, bodies, prompts)]
    ratio = api.tokens_per_s / engine.tokens_per_s
    expected = sum(b["max_tokens"] for b in bodies)
    result = {"flags": list(load.flags), "requests": len(bodies), "concurrency": load.concurrency,
              "prompt_tokens": sum(len(p) for p in prompts), "server_start_s": up_s,
              "api": api.row(), "engine": engine.row(), "api_over_engine": round(ratio, 3), "goal": GOAL,
              "goal_met": ratio >= GOAL, "streams_whole": sum(whole),
              "passed": all(whole) and engine.output_tokens == expected == api.output_tokens}
    result["headline"] = (f"API {api.tokens_per_s:.0f} tok/s vs engine {engine.tokens_per_s:.0f} at c="
                          f"{load.concurrency}: {ratio:.2f}x (goal >= {GOAL}: {'met' if ratio >= GOAL else 'MISSED'}); "
                          f"{sum(whole)}/{len(bodies)} streams whole; server up in {up_s} s")
    return result


def tail(log: Path) -> str:
    return log.read_bytes()[-LOG_TAIL_CHARS:].decode(errors="replace") if log.is_file() else "(no log)"

"""What keys and credits cost a request: auth + rate check + reserve + settle, on SQLite and on PostgreSQL.

    python benchmarks/ledger_overhead.py [--concurrency 64] [--requests 256] [--rounds 3] [--model DIR]
                                         [--pg-url postgresql://...] [--no-pg] [--device cpu|cuda]

One engine (the `serve` path: `resolve(args)` and the standalone engine builder), three apps over it: no
ledger, SQLite (a file in a temporary directory) and PostgreSQL (--pg-url, else a throwaway server started with
tests/postgres.py). Each round sends the same load to each app in turn, in-process (httpx's ASGI transport, so no
socket noise): `--requests` /v1/completions of 16 tokens (ignore_eos), `--concurrency` in flight. Prints each
store's mean request latency beside the no-ledger one, the difference per request, and its share of the no-ledger
latency (goal: < 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.api.accounts import Accounts  # noqa: E402
from cluster.api.server import build_api  # noqa: E402
from cluster.engine.async_engine import AsyncEngine  # noqa: E402
from cluster.ledger import open_ledger  # noqa: E402
from cluster.serve.args import ServeArgs  # noqa: E402
from cluster.serve.engine_backend import EngineBackend  # noqa: E402
from cluster.serve.engine_builder import build_engine, in_process_executor  # noqa: E402
from cluster.serve.resolved import resolve  # noqa: E402
from cluster.tokenizer import load_tokenizer  # noqa: E402

COMPLETION_TOKENS = 16
PROMPT = [1, 1500, 2500, 3500, 4500, 5500, 6500, 7500]  # token ids


async def load(app: Any, key: str | None, requests: int, concurrency: int) -> list[float]:
    """Each request's latency in seconds; every request must succeed."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limit = asyncio.Semaphore(concurrency)
    body = {"prompt": PROMPT, "max_tokens": COMPLETION_TOKENS, "ignore_eos": True, "temperature": 0}

    async def one(c: httpx.AsyncClient) -> float:
        async with limit:
            start = time.perf_counter()
            r = await c.post("/v1/completions", json=body)
            took = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text}")
        return took

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench", headers=headers,
                                 timeout=600, limits=httpx.Limits(max_connections=None)) as c:
        return list(await asyncio.gather(*(one(c) for _ in range(requests))))


async def new_key(url: str) -> str:
    ledger = open_ledger(url)
    try:
        return (await ledger.create_key("bench", 10**15))[1]
    finally:
        await ledger.close()


async def run(args: argparse.Namespace, pg_url: str | None, workdir: Path) -> None:
    resolved = resolve(ServeArgs(model=args.model, device=args.device, max_num_seqs=max(args.concurrency, 1)))
    engine = AsyncEngine(lambda: build_engine(resolved, in_process_executor(resolved)))
    try:
        backend = EngineBackend(engine, resolved.moe_kernel)
        tok = load_tokenizer(resolved.tokenizer_version)
        urls: dict[str, str | None] = {"none": None, "sqlite": f"sqlite:///{workdir}/ledger.db"}
        if pg_url:
            urls["postgres"] = pg_url
        apps, keys, accounts = {}, {}, []
        for name, url in urls.items():
            acc = Accounts.open(url, resolved.args.pricing, resolved.args.reservation_ttl_s)
            accounts.append(acc)
            apps[name] = build_api(backend, tok, resolved.model_name, resolved.config.max_position_embeddings,
                                   resolved.sampling, resolved.api, accounts=acc)
            keys[name] = await new_key(url) if url else None
            await acc.start()
        latencies: dict[str, list[float]] = {name: [] for name in apps}
        for name, app in apps.items():  # warm: the engine's first batches, the ledger's connections
            await load(app, keys[name], args.concurrency, args.concurrency)
        for _ in range(args.rounds):
            for name, app in apps.items():
                latencies[name] += await load(app, keys[name], args.requests, args.concurrency)
        for acc in accounts:
            await acc.close()
    finally:
        engine.shutdown()
    base = statistics.mean(latencies["none"])
    print(f"model {resolved.model_name} on {resolved.device}, concurrency {args.concurrency}, "
          f"{args.rounds} x {args.requests} requests of {COMPLETION_TOKENS} tokens per store")
    print(f"{'store':<10} {'mean latency':>13} {'p50':>9} {'overhead/request':>17} {'share':>8}")
    for name, ts in latencies.items():
        mean = statistics.mean(ts)
        share = (mean - base) / base
        goal = "" if name == "none" else f"   (goal < 5%: {'met' if share < 0.05 else 'missed'})"
        print(f"{name:<10} {mean * 1e3:>10.1f} ms {statistics.median(ts) * 1e3:>6.1f} ms "
              f"{(mean - base) * 1e3:>14.2f} ms {share:>7.2%}{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256, help="requests per store per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="checkpoint directory; default: the embedded mini checkpoint")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--pg-url", default=None, help="a PostgreSQL database to use; default: start a throwaway one")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp, contextlib.ExitStack() as stack:
        pg_url = args.pg_url
        if pg_url is None and not args.no_pg:
            from tests.postgres import find_postgres_bin, postgres_server

            if find_postgres_bin() is None:
                print("no PostgreSQL server binaries: SQLite only (pass --pg-url to use a server)", file=sys.stderr)
            else:
                pg_url = stack.enter_context(postgres_server())
        asyncio.run(run(args, pg_url, Path(tmp)))


if __name__ == "__main__":
    main()

"""Stream batches across the Serve hop (issue 25, item 3): one Ray message per token against a request's outputs
gathered for up to `stream_interval_s` (cluster/serve/stream_batches.py), side by side on one running app.

One Serve app (1 unit, `--shards` expert shards) on a local Ray, deployed from a config like KubeRay's, so that
`stream_interval_s` (a live setting of the AttentionRouter) changes between runs without a restart. Each run:
`--streams` concurrent streaming chat requests of `--tokens` tokens each (ignore_eos), through the HTTP proxy and the
Ingress. Per interval: output tokens/s over the run, and the gaps between a stream's consecutive chunks as the client
receives them (p50, p99: batching makes them bursty), and the time to first token. Intervals are run in
interleaved rounds (each interval once per round) and each row is the median over rounds.

    python benchmarks/stream_batches.py                          # the embedded mini checkpoint
    python benchmarks/stream_batches.py --intervals 0 0.005 0.01 0.02 0.05 --rounds 3

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.side_by_side import write_rows  # noqa: E402
from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.parallel.channel import free_port  # noqa: E402
from cluster.serve.local_ray import APP_NAME  # noqa: E402
from tests.http import data_of  # noqa: E402


def config(model: str, shards: int, port: int, interval_s: float) -> dict:
    return {"http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "cluster.serve.app:build_app",
                              "args": {"model": model, "shards": shards, "device": "cpu", "ingress_replicas": 1,
                                       "max_num_seqs": 128, "kv_cache_bytes": "1GiB"},
                              "deployments": [{"name": "AttentionRouter",
                                               "user_config": {"stream_interval_s": interval_s}}]}]}


async def one_stream(client: httpx.AsyncClient, tokens: int) -> tuple[int, float, list[float]]:
    """(content chunks, time to first chunk, gaps between chunks) of one streaming request."""
    body = {"messages": [{"role": "user", "content": "Raconte une longue histoire."}], "stream": True,
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    start = time.perf_counter()
    arrivals = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            payload = data_of(line)
            if payload is None or payload == "[DONE]":
                continue
            chunk = json.loads(payload)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return len(arrivals), arrivals[0] - start, gaps


async def run(port: int, streams: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=httpx.Limits(max_connections=streams + 4)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, tokens) for _ in range(streams)))
        seconds = time.perf_counter() - start
    chunks = sum(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[2])
    ttfts = sorted(r[1] for r in results)
    return {"tokens_per_s": chunks / seconds, "gap_p50_ms": 1e3 * gaps[len(gaps) // 2],
            "gap_p99_ms": 1e3 * gaps[int(len(gaps) * 0.99)], "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--intervals", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    opts = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    model = opts.model or str(ensure_default_checkpoint())
    port = free_port("127.0.0.1")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = _get_global_client()
    runs: dict[float, list[dict]] = {interval: [] for interval in opts.intervals}
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(config(model, opts.shards, port, 0.0)), _blocking=True)
        asyncio.run(run(port, opts.streams, 8))  # warm: the first requests pay one-time costs
        for _ in range(opts.rounds):
            for interval in opts.intervals:
                # Live (the AttentionRouter's user_config): the same replica, reconfigured.
                client.deploy_apps(ServeDeploySchema.model_validate(config(model, opts.shards, port, interval)),
                                   _blocking=True)
                runs[interval].append(run_settled(port, opts.streams, opts.tokens, interval))
    finally:
        serve.shutdown()
        ray.shutdown()
    base = statistics.median(r["tokens_per_s"] for r in runs[opts.intervals[0]])
    rows = []
    print(f"{opts.streams} streams x {opts.tokens} tokens, median of {opts.rounds} interleaved rounds")
    print(f"{'interval ms':>11} {'tokens/s':>9} {'vs first':>8} {'gap p50 ms':>10} {'gap p99 ms':>10} "
          f"{'TTFT p50 ms':>11}")
    for interval, results in runs.items():
        row = {"interval_s": interval, **{k: round(statistics.median(r[k] for r in results), 2) for k in results[0]}}
        row["vs_first"] = round(row["tokens_per_s"] / base, 3)
        rows.append(row)
        print(f"{1e3 * interval:>11g} {row['tokens_per_s']:>9.1f} {row['vs_first']:>8.3f} {row['gap_p50_ms']:>10.2f} "
              f"{row['gap_p99_ms']:>10.2f} {row['ttft_p50_ms']:>11.1f}")
    write_rows(opts.out, rows)
    return 0


def run_settled(port: int, streams: int, tokens: int, interval: float) -> dict:
    """One run, once the replica reports the new interval (a reconfigure may land after deploy_apps returns)."""
    deadline = time.monotonic() + 60
    while httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["stats"]["stream_interval_s"] != interval:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the AttentionRouter did not take stream_interval_s={interval}")
        time.sleep(0.05)  # polling the replica's state, not waiting in its place
    return asyncio.run(run(port, streams, tokens))


if __name__ == "__main__":
    sys.exit(main())

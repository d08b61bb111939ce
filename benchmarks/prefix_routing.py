"""Prefix-cache hit rate across serving units: Serve's default router against prefix-aware routing (issue 28).

The workload of tests/test_prefix_routing.py: `--prompts` distinct system prompts of `--system-blocks` KV blocks,
each followed by `--turns` varied user turns (8..40 tokens), sent as token ids to /v1/completions in waves (one user
turn of every system prompt at once, shuffled), one output token each. Hit rate = prompt tokens the engines found
in their prefix caches (usage.prompt_tokens_details.cached_tokens) / prompt tokens.

Measured in one run, one row each:
- 1 unit: the single-process app (`--no-ray`), the same engine and prefix cache: the reference;
- 2 units on Serve with `prefix_routing: false` (power of two choices), `--rounds` fresh apps (it draws at random);
- 2 units on Serve with prefix routing (cluster/serve/prefix_routing.py), `--rounds` fresh apps.

    python benchmarks/prefix_routing.py                  # the embedded mini checkpoint, 1 shard a unit
    python benchmarks/prefix_routing.py --rounds 5 --model DIR --shards 0   # a dense checkpoint

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.parallel.channel import free_port  # noqa: E402
from cluster.serve.args import ServeArgs  # noqa: E402
from cluster.serve.local_ray import APP_NAME  # noqa: E402
from tests.test_prefix_routing import ideal_hit_rate, one_unit_hit_rate, send_waves, workload  # noqa: E402


def two_unit_hit_rate(args: ServeArgs, port: int, waves: list[list[list[int]]]) -> float:
    from ray import serve

    from cluster.serve.app import build_app

    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    try:
        async def run() -> tuple[int, int]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                return await send_waves(client, waves)

        cached, prompt_tokens = asyncio.run(run())
    finally:
        serve.delete(APP_NAME)
    return cached / prompt_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    parser.add_argument("--shards", type=int, default=1, help="expert shards a unit (0 for a dense checkpoint)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-blocks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="fresh 2-unit apps per router")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    model_dir = Path(opts.model) if opts.model else ensure_default_checkpoint("mini")
    args = ServeArgs(model=str(model_dir), shards=opts.shards, units=2, ingress_replicas=1, device="cpu",
                     kv_cache_bytes=2**28, replica_cpus=0.5, shard_cpus=0.5)
    waves = workload(random.Random(opts.seed), opts.prompts, opts.turns, opts.system_blocks)
    n = sum(len(w) for w in waves)
    print(f"{model_dir.name}: {opts.prompts} system prompts x {opts.turns} turns = {n} requests, "
          f"{opts.system_blocks} shared blocks each; ideal hit rate (one cache big enough) {ideal_hit_rate(waves):.3f}",
          flush=True)
    one_unit = one_unit_hit_rate(args, waves)
    rows = [("1 unit (single process)", [one_unit])]
    print(f"1 unit: {one_unit:.3f}", flush=True)

    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)  # logical CPUs: actors are mostly idle
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for label, routing in (("2 units, power of two choices", False), ("2 units, prefix routing", True)):
        rates = []
        for _ in range(opts.rounds):
            rates.append(two_unit_hit_rate(args.model_copy(update={"prefix_routing": routing}), port, waves))
            print(f"{label}: {rates[-1]:.3f}", flush=True)
        rows.append((label, rates))
    serve.shutdown()
    ray.shutdown()

    print()
    print(f"| router | hit rate (mean of {opts.rounds}) | min | max | / 1 unit |")
    print("|---|---|---|---|---|")
    for label, rates in rows:
        mean = statistics.fmean(rates)
        print(f"| {label} | {mean:.3f} | {min(rates):.3f} | {max(rates):.3f} | {mean / one_unit:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

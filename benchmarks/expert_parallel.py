"""Expert parallelism: the token channel against a plain Ray actor call, and the distributed app's throughput.

    python benchmarks/expert_parallel.py [--requests 64] [--shards 2 4] [--attention-ranks 2] [--model DIR]
                                         [--out FILE]

One run, side by side:
  1. Per-layer dispatch + combine round trip (split by shard, send, reply, combine) through `ExpertParallelExecutor`
     on shards that reply at once (the transport alone, no expert math), at decode batch 1 and 32, with 2 shards:
     the shared-memory and gloo channels vs the same batches sent as plain Ray actor calls (and each channel's
     frames alone, without the executor's split and combine). Goal: channel <= 0.3 ms at batch 32.
  2. End-to-end output tokens/s over HTTP: the Serve app (Ingress -> AttentionRouter -> 2 or 4 ExpertShards on
     local Ray) against the single-process app (`moe-cluster serve --no-ray`) on the same seeded requests, all in
     flight at once. Goal: distributed >= 0.6x single-process. Then the same app with data-parallel attention
     (`--attention-ranks`: that many ranks, each attending with its own KV cache and holding one shard, exchanging
     over shared memory), against the single process and the sharded app of as many shards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from cluster.checkpoint.default import ensure_default_checkpoint  # noqa: E402
from cluster.config import ModelConfig  # noqa: E402
from cluster.dtype import dtype_name, parse_dtype, resolve_dtype  # noqa: E402
from cluster.parallel.channel import ChannelSpec, ReplicaChannel, open_group, serve_shard  # noqa: E402
from cluster.parallel.dispatch import ExpertParallelExecutor, ExpertTransport, RoutedBatch  # noqa: E402
from cluster.parallel.placement import assign_experts, expert_owners  # noqa: E402
from cluster.parallel.shm_channel import ShmReplicaChannel, create_files, serve_shard_shm, shm_directory  # noqa: E402
from cluster.serve.app import build_app  # noqa: E402
from cluster.serve.args import ServeArgs  # noqa: E402
from cluster.serve.local_ray import APP_NAME  # noqa: E402
from cluster.parallel.channel import free_port  # noqa: E402
from cluster.serve.unit import UNIT_ENV  # noqa: E402
from tests.asgi_client import on_standalone  # noqa: E402


class EchoWorker:
    """Replies at once with a zero partial of the right shape: what is left is the transport."""

    def run(self, batch: RoutedBatch) -> torch.Tensor:
        return torch.zeros(batch.x.shape, dtype=torch.float32)


@ray.remote(num_cpus=0.25, runtime_env={"env_vars": UNIT_ENV})
class EchoShard:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.worker = EchoWorker()

    def connect(self, spec: ChannelSpec, rank: int) -> None:
        if spec.backend == "shm":
            threading.Thread(target=serve_shard_shm, args=(spec, rank, self.worker), daemon=True).start()
        else:
            group = open_group(spec, rank)
            threading.Thread(target=serve_shard, args=(spec, group, self.worker), daemon=True).start()

    def run(self, batch: RoutedBatch) -> torch.Tensor:
        return self.worker.run(batch)


class ActorCallTransport:
    """The same batches as plain Ray actor calls, all shards at once."""

    max_rows = None

    def __init__(self, actors: list) -> None:
        self.actors = actors
        self.num_shards = len(actors)

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        refs = [None if b is None else a.run.remote(b) for a, b in zip(self.actors, batches)]
        return [None if r is None else ray.get(r) for r in refs]

    def close(self) -> None:
        pass


def time_round_trips(executor: ExpertParallelExecutor, config: ModelConfig, batch: int, iters: int,
                     dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, config.hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(config.num_experts, generator=g)[:2] for _ in range(batch)]).to(torch.int32)
    w = torch.full((batch, 2), 0.5, dtype=dtype)
    layers = iter(range(10**9))
    return _timed(lambda: executor(next(layers) % config.num_layers, x, ids, w), iters)


def _timed(fn, iters: int) -> dict:
    for _ in range(20):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": round(1e3 * statistics.median(times), 3), "p90_ms": round(1e3 * times[int(0.9 * iters)], 3)}


# (label, backend, the shm replica's spin budget): the default channel, then the same one sleeping at once.
CHANNELS = [("shm", "shm", ChannelSpec.spin_s), ("shm, no spin", "shm", 0.0), ("gloo", "gloo", 0.0)]


def open_channel(backend: str, config: ModelConfig, actors: list, dtype: str, spin_s: float) -> ExpertTransport:
    address = ray.util.get_node_ip_address()
    spec = ChannelSpec(address, free_port(address), len(actors), config.hidden_size, config.experts_per_token,
                       dtype, max_rows=1024, backend=backend, path=shm_directory() if backend == "shm" else "",
                       spin_s=spin_s)
    if backend == "shm":
        create_files(spec)
    joined = [a.connect.remote(spec, r + 1) for r, a in enumerate(actors)]
    channel = ShmReplicaChannel(spec) if backend == "shm" else ReplicaChannel(spec)
    ray.get(joined)
    return channel


@ray.remote(num_cpus=0.25, runtime_env={"env_vars": UNIT_ENV})
def channel_benchmark(config: ModelConfig, shards: int, dtype_name: str) -> list[dict]:
    """Runs as a Ray task with the replica's environment, so its end of the channel behaves like the replica's."""
    groups = assign_experts(config.num_experts, shards)
    dtype = parse_dtype(dtype_name)
    rows = []
    for label, backend, spin_s in CHANNELS:
        actors = [EchoShard.remote() for _ in groups]
        channel = open_channel(backend, config, actors, dtype_name, spin_s)
        for batch in (1, 32):
            x = torch.zeros(batch, config.hidden_size, dtype=dtype)
            whole = RoutedBatch(0, x, torch.zeros(batch, 2, dtype=torch.int32), torch.zeros(batch, 2, dtype=dtype))
            rows.append({"transport": f"{label} frames alone", "shards": shards, "batch": batch,
                         **_timed(lambda: channel.run([whole] * shards), 2000)})
            stats = time_round_trips(ExpertParallelExecutor(channel, expert_owners(groups)), config, batch, 2000,
                                     dtype)
            rows.append({"transport": f"channel ({label})", "shards": shards, "batch": batch, **stats})
            if backend == "gloo":
                stats = time_round_trips(ExpertParallelExecutor(ActorCallTransport(actors), expert_owners(groups)),
                                         config, batch, 300, dtype)
                rows.append({"transport": "ray actor call", "shards": shards, "batch": batch, **stats})
        channel.close()
        for a in actors:
            ray.kill(a)
    return rows


def make_requests(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = "the of and to in expert shard token layer router cache batch stream".split()
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 200, (1,), generator=g))
        text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (length,), generator=g))
        out.append({"messages": [{"role": "user", "content": text}], "temperature": 0,
                    "max_tokens": int(torch.randint(32, 128, (1,), generator=g))})
    return out


async def drive(client: httpx.AsyncClient, requests: list[dict]) -> tuple[int, float]:
    async def one(body: dict) -> int:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    await one({**requests[0], "max_tokens": 4})  # warm-up
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(b) for b in requests)))
    return tokens, time.perf_counter() - t0


def single_process_throughput(args: ServeArgs, requests: list[dict]) -> dict:
    tokens, seconds = on_standalone(args.model_copy(update={"shards": 1}), lambda c: drive(c, requests), 600)
    return {"system": "single process (--no-ray)", "output_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def distributed_throughput(args: ServeArgs, shards: int, port: int, requests: list[dict],
                           attention_ranks: int = 1) -> dict:
    update = {"shards": shards, "attention_ranks": attention_ranks}
    serve.run(build_app(args.model_copy(update=update)), name=APP_NAME, route_prefix="/")

    async def run() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            return await drive(c, requests)

    try:
        tokens, seconds = asyncio.run(run())
    finally:
        serve.delete(APP_NAME)
    system = f"Serve app, {shards} shards" if attention_ranks == 1 else (
        f"Serve app, {attention_ranks} attention ranks (data-parallel)")
    return {"system": system, "shards": shards, "attention_ranks": attention_ranks, "output_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--attention-ranks", type=int, nargs="*", default=[2],
                        help="data-parallel units to measure (each as many shards)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-trips-only", action="store_true", help="part 1 only")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="for both parts; auto: bf16 on CPUs with AMX, else fp32")
    parser.add_argument("--out", help="write the rows as JSON here")
    opts = parser.parse_args()
    model_dir = Path(opts.model) if opts.model else ensure_default_checkpoint("mini")
    config = ModelConfig.from_file(model_dir)
    dtype = dtype_name(resolve_dtype(opts.dtype, "cpu"))
    args = ServeArgs(model=str(model_dir), dtype=dtype, max_num_seqs=max(64, opts.requests), ingress_replicas=1)
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)  # logical CPUs: actors are mostly idle

    print(f"1. round trip per layer, {config.hidden_size}-wide {dtype} tokens, top-{config.experts_per_token}",
          flush=True)
    channel_rows = ray.get(channel_benchmark.remote(config, 2, dtype))
    for row in channel_rows:
        print(json.dumps(row), flush=True)
    app_rows = []
    if opts.round_trips_only:
        opts.shards, opts.attention_ranks = [], []
    else:
        port = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"2. {opts.requests} requests at once, greedy, on {model_dir}", flush=True)
        requests = make_requests(opts.requests, opts.seed)
        app_rows.append(single_process_throughput(args, requests))
        print(json.dumps(app_rows[-1]), flush=True)
    for shards in opts.shards:
        app_rows.append(distributed_throughput(args, shards, port, requests))
        print(json.dumps(app_rows[-1]), flush=True)
    for ranks in opts.attention_ranks:
        app_rows.append(distributed_throughput(args, ranks, port, requests, attention_ranks=ranks))
        print(json.dumps(app_rows[-1]), flush=True)
    serve.shutdown()
    ray.shutdown()

    print()
    by = {(r["transport"], r["batch"]): r["median_ms"] for r in channel_rows}
    for batch in (1, 32):
        call = by[("ray actor call", batch)]
        for label, _, _ in CHANNELS:
            ch = by[(f"channel ({label})", batch)]
            print(f"batch {batch:>2}: channel ({label}) {ch:.3f} ms (frames alone "
                  f"{by[(f'{label} frames alone', batch)]:.3f}), actor call {call:.3f} ms, "
                  f"channel/actor call = {ch / call:.2f}")
    print(f"batch 32: spinning first / sleeping at once = "
          f"{by[('channel (shm)', 32)] / by[('channel (shm, no spin)', 32)]:.2f}")
    ok = by[("channel (shm)", 32)] <= 0.3  # the channel a one-machine CPU unit uses
    print(f"goal: channel round trip <= 0.3 ms at batch 32: {'PASS' if ok else 'FAIL'}")
    sharded = {r["shards"]: r["tokens_per_s"] for r in app_rows[1:] if r["attention_ranks"] == 1}
    for row in app_rows[1:]:
        single = app_rows[0]["tokens_per_s"]
        ratio = row["tokens_per_s"] / single
        line = (f"{row['system']}: {row['tokens_per_s']} tok/s, {ratio:.2f}x single process ({single} tok/s): "
                f"goal >= 0.6 {'PASS' if ratio >= 0.6 else 'FAIL'}")
        if row["attention_ranks"] > 1 and row["shards"] in sharded:
            line += f"; {row['tokens_per_s'] / sharded[row['shards']]:.2f}x the {row['shards']}-shard app"
        print(line)
    if opts.out:
        Path(opts.out).write_text(json.dumps({"round_trips": channel_rows, "throughput": app_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

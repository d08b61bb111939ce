"""A serving unit's expert shards, seen from its AttentionRouter replica: start, connect, watch, bring back.

The shards are Ray actors placed in the replica's placement-group bundles. The replica opens the token channel
to them once; a supervisor thread then pings them. When a shard dies (or the channel fails mid-step, which fails
the step's requests with 503), the unit closes the channel, waits for Ray to restart the shard (which reloads
its experts), and reconnects every shard on a fresh channel. Meanwhile `health()` says "recovering".
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.api.backend import Health
from cluster.config import ModelConfig
from cluster.parallel.channel import ChannelSpec, ReplicaChannel
from cluster.parallel.shm_channel import ShmReplicaChannel, create_files, shm_directory
from cluster.parallel.dispatch import ExpertParallelExecutor, ExpertTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.serve.args import ServeArgs
from cluster.serve.expert_shard import ExpertShard

log = logging.getLogger(__name__)

RunOnEngine = Callable[[Callable], Future]
# Processes of a unit take turns on the cores every layer: OpenMP workers that spin long after each parallel region
# (libgomp's default, ~300k spins) steal the core a shard computes on, while not spinning at all (PASSIVE) slows
# the replica's own forward. A short spin keeps back-to-back ops fast and yields while the shards work.
UNIT_ENV = {"GOMP_SPINCOUNT": "20000"}
_PING_PERIOD_S = 0.5
_PING_TIMEOUT_S = 10.0


def unit_bundles(args: ServeArgs, num_shards: int, device: str) -> list[dict[str, float]]:
    """Placement-group bundles of one unit. On GPUs shard 0 shares bundle 0 (one GPU) with the replica."""
    if device == "cuda":
        if num_shards == 0:
            return [{"CPU": args.replica_cpus, "GPU": 1}]
        return ([{"CPU": args.replica_cpus + args.shard_cpus, "GPU": 1}]
                + [{"CPU": args.shard_cpus, "GPU": 1} for _ in range(num_shards - 1)])
    return [{"CPU": args.replica_cpus}] + [{"CPU": args.shard_cpus} for _ in range(num_shards)]


def replica_gpus(num_shards: int, device: str) -> float:
    if device != "cuda":
        return 0
    return 0.5 if num_shards else 1


class ShardedUnit:
    def __init__(self, args: ServeArgs, device: str, config: ModelConfig):
        self.args = args
        self.device = device
        self.config = config
        self.groups = assign_experts(config.num_experts, args.num_shards(config))
        self.state, self.detail = "starting", "loading expert shards"
        self.shards = [self._start_shard(i, g) for i, g in enumerate(self.groups)]
        self._wait_loaded()
        self.executor = ExpertParallelExecutor(self._connect(), expert_owners(self.groups))
        self.state, self.detail = "ok", ""
        self.recoveries = 0
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- start-up ----------------------------------------------------------------------------------------------
    def _start_shard(self, index: int, experts: tuple[int, ...]):
        cuda = self.device == "cuda"
        options = {"num_cpus": self.args.shard_cpus, "num_gpus": (0.5 if index == 0 else 1) if cuda else 0,
                   "max_restarts": -1, "max_concurrency": 4, "runtime_env": {"env_vars": UNIT_ENV}}
        pg = get_current_placement_group()
        if pg is not None:
            bundle = index if cuda else index + 1
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
        threads = self.args.shard_threads or _default_shard_threads(len(self.groups), cuda)
        actor = ray.remote(ExpertShard).options(**options)
        return actor.remote(str(self.args.model_dir()), experts, self.args.resolved_dtype(self.device), self.device,
                            self.args.moe_backend, threads)

    def _wait_loaded(self) -> None:
        t0 = time.perf_counter()
        for i, shard in enumerate(self.shards):
            info = ray.get(shard.info.remote())
            print(f"expert shard {i}: experts {info['experts']}, {info['bytes'] / 1e6:.1f} MB, "
                  f"loaded in {info['load_s']}s (pid {info['pid']})", file=sys.stderr, flush=True)
        log.info("%d expert shards ready in %.1fs", len(self.shards), time.perf_counter() - t0)

    def _connect(self) -> ExpertTransport:
        """Open a fresh channel: the shards join from their actors while this replica hosts the meeting point."""
        address = ray.util.get_node_ip_address()
        backend = self._channel_backend()
        spec = ChannelSpec(address=address, port=_free_port(address), num_shards=len(self.shards),
                           hidden=self.config.hidden_size, top_k=self.config.experts_per_token,
                           dtype=self.args.resolved_dtype(self.device),
                           max_rows=self.args.max_num_batched_tokens, backend=backend,
                           path=shm_directory() if backend == "shm" else "",
                           exact_sizes=backend == "nccl", timeout_s=self.args.step_timeout_s)
        if backend == "shm":
            create_files(spec)
        joined = [shard.connect.remote(spec, rank + 1) for rank, shard in enumerate(self.shards)]
        channel = ShmReplicaChannel(spec) if backend == "shm" else ReplicaChannel(spec, self.device)
        ray.get(joined, timeout=spec.connect_timeout_s)
        return channel

    def _channel_backend(self) -> str:
        """`auto`: shared memory when every shard is on this machine and on CPU, else gloo (CPU) or NCCL (GPU)."""
        if self.args.channel != "auto":
            return self.args.channel
        if self.device == "cuda":
            return "nccl"
        here = ray.get_runtime_context().get_node_id()
        nodes = ray.get([s.node_id.remote() for s in self.shards], timeout=_PING_TIMEOUT_S)
        return "shm" if all(n == here for n in nodes) else "gloo"

    # -- supervision -------------------------------------------------------------------------------------------
    def supervise(self, run_on_engine: RunOnEngine) -> None:
        """Start watching the shards; transports are swapped on the engine thread through `run_on_engine`."""
        self._run_on_engine = run_on_engine
        self._supervisor = threading.Thread(target=self._watch, name="shard-supervisor", daemon=True)
        self._supervisor.start()

    def health(self) -> Health:
        state, detail = self.state, self.detail
        if state == "ok" and self._channel_broken():  # failed mid-step; the supervisor is about to notice
            state, detail = "recovering", "the token channel failed; restarting the expert shards"
        return Health(state, detail, {"shards": len(self.shards), "recoveries": self.recoveries})

    def shard_info(self) -> list[dict]:
        return ray.get([s.info.remote() for s in self.shards], timeout=_PING_TIMEOUT_S)

    def close(self) -> None:
        self._stop.set()
        self.executor.transport.close()
        for shard in self.shards:
            ray.kill(shard, no_restart=True)

    def _watch(self) -> None:
        while not self._stop.wait(_PING_PERIOD_S):
            lost = self._lost_shard()
            if lost is not None:
                self._recover(lost)

    def _channel_broken(self) -> bool:
        return getattr(self.executor.transport, "broken", False)

    def _lost_shard(self) -> str | None:
        if self._channel_broken():
            return "the token channel failed"
        for i, shard in enumerate(self.shards):
            try:
                ray.get(shard.ping.remote(), timeout=_PING_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                continue  # busy, not dead: the channel's own timeout catches a hung shard
            except ray.exceptions.RayError as e:
                return f"expert shard {i} died ({type(e).__name__})"
        return None

    def _recover(self, reason: str) -> None:
        self.state, self.detail = "recovering", f"{reason}; restarting the expert shards"
        log.warning("serving unit recovering: %s", reason)
        old: ExpertTransport = self.executor.transport
        self._run_on_engine(lambda _: old.close()).result()
        deadline = time.monotonic() + self.args.recovery_timeout_s
        while not self._stop.is_set():
            try:
                ray.get([s.ping.remote() for s in self.shards], timeout=_PING_TIMEOUT_S)  # restarted and reloaded
                channel = self._connect()
                self._run_on_engine(lambda _: setattr(self.executor, "transport", channel)).result()
                self.recoveries += 1
                self.state, self.detail = "ok", ""
                log.warning("serving unit recovered (%d recoveries)", self.recoveries)
                return
            except Exception as e:  # still restarting, or the reconnect failed: try again until the deadline
                if time.monotonic() > deadline:
                    self.state, self.detail = "failed", f"{reason}; not back after " \
                                                        f"{self.args.recovery_timeout_s:.0f}s: {e}"
                    log.error("serving unit failed: %s", self.detail)
                    return
                time.sleep(1.0)


def _default_shard_threads(num_shards: int, cuda: bool) -> int:
    return 1 if cuda else max(1, (os.cpu_count() or 1) // max(1, num_shards))


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]

"""A serving unit's expert shards, seen from its AttentionRouter replica: start, connect, watch, bring back.

Where each shard runs follows `cluster.parallel.layout` (the planner's rule too): on GPUs the shard sharing GPU 0
with the replica runs in this process (a local `ShardWorker`; NCCL refuses two ranks on one GPU) and the others are
Ray actors, one GPU each; on CPU every shard is an actor. The actors sit in the replica's placement-group bundles.
The replica opens the token channel to the actors once; a supervisor thread then pings them.

When a shard dies, or the channel fails mid-step (the step's requests fail with 503), the unit drops the channel,
kills the shards that missed a round's deadline (hung, not dead: Ray restarts them; on NCCL every remote shard, since
a shard blocked on an aborted communicator may never return), waits for Ray to bring every shard back (a restarted
one reloads its experts), and reconnects them on a fresh channel. No wait of the recovery is unbounded: each layer's
round waits at most `step_timeout_s` for its replies, so a hung shard gives the engine thread back within that, and
an engine thread that never does fails the unit after `recovery_timeout_s` (Serve then replaces it). Meanwhile
`health()` says "recovering".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.health import Health
from cluster.parallel.channel import ChannelSpec, ReplicaChannel, free_port
from cluster.parallel.dispatch import ExpertParallelExecutor, ExpertTransport, SplitPhaseTransport
from cluster.parallel.hybrid import HybridTransport
from cluster.parallel.in_process import InProcessTransport
from cluster.parallel.layout import UnitLayout
from cluster.parallel.placement import expert_owners
from cluster.parallel.shard_worker import ShardWorker
from cluster.parallel.shm_channel import ShmReplicaChannel, create_files, shm_directory
from cluster.serve.args import ServeArgs
from cluster.serve.expert_shard import ExpertShard
from cluster.serve.resolved import ResolvedArgs

log = logging.getLogger(__name__)

RunOnEngine = Callable[[Callable], Future]
# Processes of a unit take turns on the cores every layer: OpenMP workers that spin long after each parallel region
# (libgomp's default, ~300k spins) steal the core a shard computes on, while not spinning at all (PASSIVE) slows
# the replica's own forward. A short spin keeps back-to-back ops fast and yields while the shards work.
UNIT_ENV = {"GOMP_SPINCOUNT": "20000"}
_PING_PERIOD_S = 0.5
_PING_TIMEOUT_S = 10.0
_ENGINE_SLACK_S = 5.0  # beyond the step timeout, for the engine thread to take a command


def unit_bundles(args: ServeArgs, layout: UnitLayout) -> list[dict[str, float]]:
    """Placement-group bundles of one unit: the replica's (with any shard running in its process), then one per
    channel rank; a whole GPU each on CUDA (no GPU holds two NCCL ranks)."""
    return layout.bundles(args.replica_cpus, args.shard_cpus)


def replica_gpus(layout: UnitLayout) -> float:
    """The replica owns its GPU whole: a shard sharing it runs in the replica's process. Data-parallel: the ranks
    hold the GPUs, the replica none."""
    return 1 if layout.device == "cuda" and not layout.data_parallel else 0


def shard_options(args: ServeArgs, layout: UnitLayout, shard: int) -> dict[str, Any]:
    """Ray actor options of a shard that runs as an actor (one with a channel rank), in its bundle."""
    if layout.channel_ranks[shard] is None:
        raise ValueError(f"shard {shard} runs in the replica's process, not as an actor")
    return {"num_cpus": args.shard_cpus, "num_gpus": 1 if layout.device == "cuda" else 0,
            "bundle": layout.bundle_index(shard)}


class ShardedUnit:
    def __init__(self, resolved: ResolvedArgs):
        self.resolved = resolved
        self.args = resolved.args
        self.device = resolved.device
        self.config = resolved.config
        self.layout = resolved.layout
        self.groups = resolved.shard_groups
        self.state, self.detail = "starting", "loading expert shards"
        self.actors = {s: self._start_shard(s) for s in self.layout.remote_shards}
        self.local = {s: self._load_local(s) for s in self.layout.local_shards}  # while the actors load theirs
        self._wait_loaded()
        self.executor = ExpertParallelExecutor(self._connect(), expert_owners(self.groups))
        self.state, self.detail = "ok", ""
        self.recoveries = 0
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._run_on_engine: RunOnEngine | None = None

    # -- start-up ----------------------------------------------------------------------------------------------
    def _start_shard(self, shard: int):
        options = shard_options(self.args, self.layout, shard)
        bundle = options.pop("bundle")
        options.update({"max_restarts": -1, "max_concurrency": 4, "runtime_env": {"env_vars": UNIT_ENV}})
        pg = get_current_placement_group()
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
        threads = self.args.shard_threads or _default_shard_threads(self.layout.num_shards, self.device == "cuda")
        actor = ray.remote(ExpertShard).options(**options)
        r = self.resolved
        return actor.remote(str(r.model_dir), r.config, self.groups[shard], r.dtype, self.device,
                            r.moe_backend, threads, r.args.load_format, r.quantization)

    def _load_local(self, shard: int) -> ShardWorker:
        t0 = time.perf_counter()
        r = self.resolved
        worker = ShardWorker.load(r.model_dir, r.config, self.groups[shard], r.dtype, self.device,
                                  r.moe_backend, load_format=r.args.load_format, quantization=r.quantization)
        if self.device == "cuda":
            worker.warm_up(self.args.max_num_batched_tokens, self.config.experts_per_token)
        log.info("expert shard %d: experts %s, %.1f MB, loaded in %.2fs in the replica's process", shard,
                 list(worker.expert_ids), worker.nbytes / 1e6, time.perf_counter() - t0)
        return worker

    def _wait_loaded(self) -> None:
        t0 = time.perf_counter()
        for shard, actor in self.actors.items():
            info = ray.get(actor.info.remote())
            log.info("expert shard %d: experts %s, %.1f MB, loaded in %ss (pid %s)", shard, info["experts"],
                     info["bytes"] / 1e6, info["load_s"], info["pid"])
        log.info("%d expert shards ready in %.1fs", self.layout.num_shards, time.perf_counter() - t0)

    def _connect(self) -> ExpertTransport:
        """A fresh transport: a channel the actors join (this replica hosts the meeting point), with the local
        shards beside it when there are any."""
        if not self.actors:  # one shard on one GPU, in this process
            return InProcessTransport([self.local[s] for s in range(len(self.local))])
        channel = self._open_channel()
        return HybridTransport(self.local, channel, self.layout.remote_shards) if self.local else channel

    def _open_channel(self) -> SplitPhaseTransport:
        address = ray.util.get_node_ip_address()
        backend = self.channel_backend = self._channel_backend()
        spec = ChannelSpec(address=address, port=free_port(address), num_shards=len(self.actors),
                           hidden=self.config.hidden_size, top_k=self.config.experts_per_token,
                           dtype=self.resolved.dtype,
                           max_rows=self.args.max_num_batched_tokens, backend=backend,
                           path=shm_directory() if backend == "shm" else "",
                           exact_sizes=backend == "nccl", timeout_s=self.args.step_timeout_s)
        if backend == "shm":
            create_files(spec)
        joined = [self.actors[s].connect.remote(spec, self.layout.channel_ranks[s]) for s in self.layout.remote_shards]
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
        nodes = ray.get([a.node_id.remote() for a in self.actors.values()], timeout=_PING_TIMEOUT_S)
        return "shm" if all(n == here for n in nodes) else "gloo"

    # -- supervision -------------------------------------------------------------------------------------------
    def supervise(self, run_on_engine: RunOnEngine) -> None:
        """Start watching the shards; transports are swapped on the engine thread through `run_on_engine`."""
        self._run_on_engine = run_on_engine
        if not self.actors:
            return  # every shard runs in this process: nothing can be lost apart from it
        self._supervisor = threading.Thread(target=self._watch, name="shard-supervisor", daemon=True)
        self._supervisor.start()

    def health(self) -> Health:
        state, detail = self.state, self.detail
        if state == "ok" and self._channel_broken():  # failed mid-step; the supervisor is about to notice
            state, detail = "recovering", "the token channel failed; restarting the expert shards"
        return Health(state, detail, {"shards": self.layout.num_shards, "recoveries": self.recoveries})

    def shard_info(self) -> list[dict]:
        """One entry per shard, in shard order (a local shard's pid is the replica's)."""
        remote = ray.get([a.info.remote() for a in self.actors.values()], timeout=_PING_TIMEOUT_S)
        info = dict(zip(self.actors, remote))
        for s, worker in self.local.items():
            info[s] = {"experts": list(worker.expert_ids), "bytes": worker.nbytes, "pid": os.getpid(),
                       "device": self.device, "serving": True}
        return [{**info[s], "channel_rank": self.layout.channel_ranks[s]} for s in range(self.layout.num_shards)]

    def close(self) -> None:
        self._stop.set()
        self.executor.transport.close()
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)

    def _watch(self) -> None:
        while self.state != "failed" and not self._stop.wait(_PING_PERIOD_S):  # failed: Serve replaces the replica
            lost = self._lost_shards()
            if lost is not None:
                self._recover(*lost)

    def _channel_broken(self) -> bool:
        return getattr(self.executor.transport, "broken", False)

    def _lost_shards(self) -> tuple[str, tuple[int, ...]] | None:
        """(why, the shards that hung) when the unit must recover, else None. Pings every actor; an unanswered ping
        is a busy or hung shard (the next step's deadline tells them apart), so it only waits while the channel
        holds up."""
        pings = {actor.ping.remote(): shard for shard, actor in self.actors.items()}
        pending = list(pings)
        give_up = time.monotonic() + _PING_TIMEOUT_S
        while True:
            broken = self._broken_channel()
            if broken is not None:
                return broken
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=_PING_PERIOD_S)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    return f"expert shard {pings[ref]} died ({type(e).__name__})", ()
            if not pending or time.monotonic() > give_up or self._stop.is_set():
                return None

    def _broken_channel(self) -> tuple[str, tuple[int, ...]] | None:
        if not self._channel_broken():
            return None
        hung = tuple(self.layout.shard_at_rank(r) for r in getattr(self.executor.transport, "late_ranks", ()))
        if hung:
            return f"expert shard(s) {_ids(hung)} missed the round deadline of {self.args.step_timeout_s:g}s", hung
        return "the token channel failed", ()

    def _recover(self, reason: str, hung: tuple[int, ...]) -> None:
        self.state, self.detail = "recovering", f"{reason}; restarting the expert shards"
        log.warning("serving unit recovering: %s", reason)
        deadline = time.monotonic() + self.args.recovery_timeout_s
        old: ExpertTransport = self.executor.transport
        if not self._on_engine(lambda _: old.close(), self.args.step_timeout_s + _ENGINE_SLACK_S):
            getattr(old, "abort", lambda: None)()  # a step still holds it: fail that step now (the close stays queued)
        if hung and self.channel_backend == "nccl":
            hung = self.layout.remote_shards  # a peer of a hung rank may be stuck inside NCCL too: restart them all
        for shard in hung:  # Ray restarts it in a fresh process
            ray.kill(self.actors[shard], no_restart=False)
        while not self._stop.is_set():
            try:
                ray.get([a.ping.remote() for a in self.actors.values()], timeout=_PING_TIMEOUT_S)  # back and loaded
                transport = self._connect()
            except Exception as e:  # still restarting, or the reconnect failed: try again until the deadline
                if time.monotonic() > deadline:
                    return self._fail(f"{reason}; not back after {self.args.recovery_timeout_s:.0f}s: {e}")
                time.sleep(1.0)
                continue
            if not self._on_engine(lambda _: setattr(self.executor, "transport", transport),
                                   max(0.0, deadline - time.monotonic())):
                return self._fail(f"{reason}; the engine thread did not take the new channel in time")
            self.recoveries += 1
            self.state, self.detail = "ok", ""
            log.warning("serving unit recovered (%d recoveries)", self.recoveries)
            return

    def _on_engine(self, fn: Callable, timeout_s: float) -> bool:
        """Run `fn` on the engine thread between two steps; False if it did not run within `timeout_s`."""
        assert self._run_on_engine is not None
        try:
            self._run_on_engine(fn).result(timeout=timeout_s)
        except FutureTimeout:
            return False
        except Exception as e:  # it ran, and failed: the supervisor carries on
            log.warning("on the engine thread: %s: %s", type(e).__name__, e)
        return True

    def _fail(self, detail: str) -> None:
        self.state, self.detail = "failed", detail
        log.error("serving unit failed: %s", detail)


def _default_shard_threads(num_shards: int, cuda: bool) -> int:
    return 1 if cuda else max(1, (os.cpu_count() or 1) // max(1, num_shards))


def _ids(shards: tuple[int, ...]) -> str:
    return ", ".join(map(str, shards))

"""The AttentionRank Ray actor: one rank of a data-parallel unit (`cluster.serve.dp_unit`), an engine with its own
requests and KV cache whose MoE layers exchange tokens with the other ranks' (`cluster.engine.data_parallel`).

It loads the dense model and its own shard of the experts, builds its engine (warm-up and probe steps run its
experts alone: no other rank takes part yet), then joins the unit's group when the replica says where (`connect`,
again after a lost rank). Requests come from the unit's replica; their outputs go back in batches, one Ray message
each (`cluster.serve.stream_batches`). Ray restarts it when it dies; the unit then forms the group again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import aclosing
from typing import AsyncIterator

import ray
import torch

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.data_parallel import DataParallelRank
from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from cluster.health import Health
from cluster.kernels.triton_cache import usable_triton_cache
from cluster.logs import configure_logging
from cluster.metrics.engine_metrics import replica_metrics
from cluster.parallel.all_to_all import AllToAllExperts, ExpertAllToAll
from cluster.parallel.channel import free_port
from cluster.parallel.rank_group import RankGroupSpec, open_rank_group
from cluster.parallel.shard_worker import ShardWorker
from cluster.serve.engine_backend import EngineBackend, final_outputs
from cluster.serve.engine_builder import build_engine
from cluster.serve.resolved import ResolvedArgs
from cluster.serve.stream_batches import batched

log = logging.getLogger(__name__)


class AttentionRank:
    def __init__(self, resolved: ResolvedArgs, rank: int, threads: int | None = None):
        configure_logging()  # this actor's process: its records reach the driver through Ray's log forwarding
        usable_triton_cache()  # before any kernel compiles here
        t0 = time.perf_counter()
        self.resolved = resolved
        self.rank = rank
        self.threads = threads
        r = resolved
        worker = ShardWorker.load(r.model_dir, r.config, r.shard_groups[rank], r.dtype, r.device, r.moe_backend,
                                  load_format=r.args.load_format, quantization=r.quantization)
        self.experts = AllToAllExperts(None, worker)
        self.engine = AsyncEngine(self._build, lambda engine: DataParallelRank(engine, self.experts))
        self.backend = EngineBackend(self.engine, r.moe_kernel,
                                     replica_metrics(r.model_name, self.engine, self._connection_health))
        self.load_s = time.perf_counter() - t0
        log.info("attention rank %d: experts %s, loaded in %.2fs", rank, list(worker.expert_ids), self.load_s)

    def _build(self) -> LLMEngine:
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: set where the forwards run
        with self.experts.alone():  # warm-up and probe steps: nothing to exchange with yet
            return build_engine(self.resolved, self.experts)

    # -- the unit's group --------------------------------------------------------------------------------------
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def meeting_point(self) -> tuple[str, int]:
        """(this node's address, a free port there): rank 0 hosts the group's store."""
        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    async def connect(self, spec: RankGroupSpec) -> None:
        """Join the unit's group (blocks until every rank has), on the engine thread between two steps."""
        await asyncio.wrap_future(self.engine.call(lambda engine: self._join(spec, engine)))

    def _join(self, spec: RankGroupSpec, engine: LLMEngine) -> None:
        lockstep = self.engine.lockstep
        assert isinstance(lockstep, DataParallelRank)
        lockstep.disconnect("the attention ranks are forming their group again")
        group = open_rank_group(spec, self.rank)
        try:
            buckets = engine.runner.decode_buckets  # decode steps padded to these take the fixed path (graph-safe)
            exchange = ExpertAllToAll(group.exchange, self.resolved.config.num_experts,
                                      self.resolved.config.experts_per_token, max(buckets, default=0),
                                      buckets=buckets, device=engine.device if spec.backend == "nccl" else "cpu")
            lockstep.connect(exchange, group.control, group)
        except BaseException:
            group.close()
            raise
        log.info("attention rank %d joined a group of %d over %s", self.rank, spec.ranks, spec.backend)

    # -- requests ----------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, stream: bool,
                       interval_s: float) -> AsyncIterator[list[RequestOutput]]:
        """The request's outputs in batches (with `stream=False` only each choice's merged final output)."""
        outputs = self.backend.generate(request_id, prompt, params)
        async with aclosing(batched(outputs if stream else final_outputs(outputs), interval_s)) as batches:
            async for batch in batches:
                yield batch

    def set_max_waiting(self, max_waiting: int) -> None:
        self.engine.max_waiting = max_waiting

    # -- health ------------------------------------------------------------------------------------------------
    def ping(self) -> tuple[int, bool, str, float]:
        """(pid, connected to the other ranks, why not, seconds the engine thread has been stuck: in the step now
        running, 0 between steps, infinite if the thread ended). Answered by the actor's event loop, so a stuck
        engine shows here rather than as silence."""
        since = self.engine.stepping_since
        stuck = float("inf") if not self.engine.running else 0.0 if since is None else time.monotonic() - since
        return os.getpid(), self.experts.exchange is not None, self.experts.lost, stuck

    def _connection_health(self) -> Health:
        """This rank's view of its unit, for its metrics: recovering while it is cut off from the other ranks."""
        if self.experts.exchange is None:
            return Health("recovering", self.experts.lost)
        return Health()

    async def stats(self) -> dict:
        return (await self.backend.health()).stats

    def info(self) -> dict:
        worker = self.experts.worker
        return {"rank": self.rank, "experts": list(worker.expert_ids), "bytes": worker.nbytes, "pid": os.getpid(),
                "device": self.resolved.device, "load_s": round(self.load_s, 2),
                "connected": self.experts.exchange is not None}

    def __del__(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

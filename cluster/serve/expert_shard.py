"""The ExpertShard Ray actor: loads its experts of every layer, then serves the token channel on a thread.

Ray places it (a GPU each, or CPUs), restarts it when it dies (or when the unit kills it for missing a step
deadline) and answers health pings; the per-layer tokens never travel through Ray, only through the channel opened
by `connect`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray
import torch

from cluster.config import ModelConfig
from cluster.kernels.triton_cache import usable_triton_cache
from cluster.logs import configure_logging
from cluster.parallel.channel import ChannelSpec, abort_group, open_group, serve_shard
from cluster.parallel.shard_worker import ShardWorker
from cluster.parallel.shm_channel import serve_shard_shm

log = logging.getLogger(__name__)


class ExpertShard:
    def __init__(self, model_dir: str, config: ModelConfig, experts: tuple[int, ...], dtype: torch.dtype,
                 device: str, backend: str, threads: int | None, load_format: str = "safetensors",
                 quantization: str | None = None):
        configure_logging()  # this actor's process: its records reach the driver through Ray's log forwarding
        usable_triton_cache()  # before any kernel compiles here
        self.device = device  # "cuda": Ray sets CUDA_VISIBLE_DEVICES to this shard's GPU
        self.threads = threads
        t0 = time.perf_counter()
        self.worker = ShardWorker.load(model_dir, config, tuple(experts), dtype, self.device, backend,
                                       load_format=load_format, quantization=quantization)
        self.load_s = time.perf_counter() - t0
        self._loop: threading.Thread | None = None
        self._group = None  # the torch.distributed group the loop serves (None: shm, or not connected)
        self.loop_exit = ""

    def info(self) -> dict:
        return {"experts": list(self.worker.expert_ids), "bytes": self.worker.nbytes, "pid": os.getpid(),
                "device": self.device, "load_s": round(self.load_s, 2), "serving": self.serving(),
                "last_exit": self.loop_exit}

    def ping(self) -> int:
        return os.getpid()

    def serving(self) -> bool:
        return self._loop is not None and self._loop.is_alive()

    def connect(self, spec: ChannelSpec, rank: int) -> None:
        """Join the replica's group (blocks until every rank joined), then serve it on a thread."""
        if self._loop is not None:
            if self._loop.is_alive() and self._group is not None:
                # The replica only reconnects after dropping the old channel. gloo's loop has seen the peer close;
                # NCCL's may still wait on a receive from an aborted communicator: abort our end too.
                abort_group(self._group)
            self._loop.join(timeout=spec.connect_timeout_s)  # shm's loop ends when the replica closes its FIFOs
            if self._loop.is_alive():
                raise RuntimeError("the previous channel is still being served")
        if self.device == "cuda":
            self.worker.warm_up(spec.max_rows, spec.top_k)  # compiled once; a reconnect finds them cached
        group = open_group(spec, rank) if spec.backend != "shm" else None  # shm: the loop opens its FIFOs
        self._group = group
        self._loop = threading.Thread(target=self._serve, args=(spec, rank, group), name="expert-channel",
                                      daemon=True)
        self._loop.start()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _serve(self, spec: ChannelSpec, rank: int, group) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: set where the matmuls run
        if group is None:
            self.loop_exit = serve_shard_shm(spec, rank, self.worker)
        else:
            self.loop_exit = serve_shard(spec, group, self.worker, self.device)
        log.info("expert channel ended: %s", self.loop_exit)

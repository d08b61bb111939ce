"""The process group of a data-parallel unit's attention ranks: formed once at start, and again after a lost rank.

Each rank is a process of its own (a Ray actor), so a torch.distributed group is the process's default one: the
all-to-all's collectives need nothing else. Rank 0 hosts the meeting point (a TCP store) on its node. Backends:
- "nccl" (GPUs): the exchange over NCCL, the per-step agreements over a gloo group of their own (host numbers:
  waiting on them never syncs the device);
- "gloo" (CPU, across machines): one gloo group does both;
- "shm" (CPU, one machine): both over shared memory (`cluster.parallel.shm_collectives`, whose files the unit made
  in `path`); the store only gathers the ranks while they open them (kept as long as the group all the same: a
  peer may still be in the last barrier when rank 0, its host, returns).
Every collective is bounded by `timeout_s`: a rank that stops answering fails its peers' steps then, instead of
hanging them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from cluster.parallel.shm_collectives import ShmCollectives


@dataclass(frozen=True)
class RankGroupSpec:
    """Where and how the ranks meet (pickled to each rank)."""

    address: str  # rank 0's node
    port: int
    ranks: int
    backend: str  # "gloo" | "nccl" | "shm"
    timeout_s: float  # the longest any collective waits for a peer
    connect_timeout_s: float = 120.0
    path: str = ""  # shm: the directory of the unit's files (`create_shm_collectives`)
    slot_bytes: int = 0  # shm: the largest message one rank sends another in one collective


@dataclass(frozen=True)
class RankGroup:
    """What one rank exchanges over: `exchange` for the all-to-all (None: the default torch.distributed group) and
    `control` for the per-step agreements (None: the exchange's)."""

    exchange: ShmCollectives | None
    control: dist.ProcessGroup | None
    store: dist.Store | None = None  # kept while the group lives: rank 0's serves the others' last barrier calls

    def close(self) -> None:
        """Leave the group (a broken one too: its peers may be gone)."""
        if self.exchange is not None:
            self.exchange.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def open_rank_group(spec: RankGroupSpec, rank: int) -> RankGroup:
    """Join the group as `rank`; blocks until every rank has."""
    store = dist.TCPStore(spec.address, spec.port, spec.ranks, rank == 0,
                          timeout=timedelta(seconds=spec.connect_timeout_s), wait_for_workers=False)
    if spec.backend == "shm":
        return RankGroup(ShmCollectives(spec.path, rank, spec.ranks, spec.slot_bytes, spec.timeout_s,
                                        store_barrier(store, rank, spec.ranks)), None, store)
    timeout = timedelta(seconds=spec.timeout_s)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.ranks, timeout=timeout)
    try:
        return RankGroup(None, dist.new_group(backend="gloo", timeout=timeout) if spec.backend == "nccl" else None)
    except BaseException:  # half formed (a peer went away meanwhile): leave it, or the next try cannot begin
        dist.destroy_process_group()
        raise


def store_barrier(store: dist.Store, rank: int, ranks: int) -> Callable[[str], None]:
    """`barrier(name)`: returns once every rank has called it with `name` (on `store`, within its timeout)."""
    def barrier(name: str) -> None:
        store.set(f"barrier/{name}/{rank}", "1")
        store.wait([f"barrier/{name}/{r}" for r in range(ranks)])

    return barrier

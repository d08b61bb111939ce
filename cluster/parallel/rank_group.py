"""The process group of a data-parallel unit's attention ranks: formed once at start, and again after a lost rank.

Each rank is a process of its own (a Ray actor), so the group is the process's default one: the all-to-all's
collectives need nothing else. Rank 0 hosts the meeting point (a TCP store) on its node. On GPUs the exchange runs
over NCCL and the per-step agreements over a gloo group of their own (host numbers: waiting on them never syncs the
device); on CPU one gloo group does both. Every collective is bounded by `timeout_s`: a rank that stops answering
fails its peers' steps then, instead of hanging them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class RankGroupSpec:
    """Where and how the ranks meet (pickled to each rank)."""

    address: str  # rank 0's node
    port: int
    ranks: int
    backend: str  # "gloo" (CPU) | "nccl" (GPUs)
    timeout_s: float  # the longest any collective waits for a peer
    connect_timeout_s: float = 120.0


def open_rank_group(spec: RankGroupSpec, rank: int) -> dist.ProcessGroup | None:
    """Join the group as `rank` (blocks until every rank has), leaving any group this process was in; -> the gloo
    control group for the per-step agreements on NCCL, else None (the default group does both)."""
    close_rank_group()
    store = dist.TCPStore(spec.address, spec.port, spec.ranks, rank == 0,
                          timeout=timedelta(seconds=spec.connect_timeout_s), wait_for_workers=False)
    timeout = timedelta(seconds=spec.timeout_s)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.ranks, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout) if spec.backend == "nccl" else None


def close_rank_group() -> None:
    """Leave the group, if in one (a broken one too: its peers may be gone)."""
    if dist.is_initialized():
        dist.destroy_process_group()

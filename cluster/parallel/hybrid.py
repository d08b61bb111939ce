"""The transport of a unit on GPUs: the shard sharing the replica's GPU runs in the replica's process, the others
over the channel.

NCCL refuses two ranks on one GPU, so the experts that share GPU 0 with the replica cannot be a channel rank of
their own (`cluster.parallel.layout`). Each round sends the remote shards' frames first, computes the local shard's
experts while they work, then collects their replies: the local work overlaps the remote work instead of adding to
it (on a GPU the local kernels and the channel's transfers run on different streams).
"""

from __future__ import annotations

import torch

from cluster.parallel.dispatch import RoutedBatch, SplitPhaseTransport
from cluster.parallel.shard_worker import ShardWorker


class HybridTransport:
    """An `ExpertTransport` over S shards: `local` ones (shard -> worker in this process) and `remote_shards`, the
    others in the order of `remote`'s ranks (`remote_shards[i]` is channel rank i + 1). With no remote shard at all
    a unit uses `InProcessTransport` instead."""

    def __init__(self, local: dict[int, ShardWorker], remote: SplitPhaseTransport, remote_shards: tuple[int, ...]):
        if remote.num_shards != len(remote_shards):
            raise ValueError(f"{len(remote_shards)} remote shards on a channel of {remote.num_shards}")
        if set(local) & set(remote_shards):
            raise ValueError(f"shards {sorted(set(local) & set(remote_shards))} are both local and remote")
        self.local = local
        self.remote = remote
        self.remote_shards = remote_shards
        self.num_shards = len(local) + len(remote_shards)
        if sorted([*local, *remote_shards]) != list(range(self.num_shards)):
            raise ValueError(f"shards {sorted([*local, *remote_shards])} do not cover 0..{self.num_shards - 1}")
        self.max_rows = remote.max_rows

    @property
    def broken(self) -> bool:
        return self.remote.broken

    @property
    def late_ranks(self) -> tuple[int, ...]:
        return self.remote.late_ranks

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * self.num_shards
        self.remote.post([batches[s] for s in self.remote_shards])  # the remote shards start now ...
        try:
            for s, worker in self.local.items():  # ... while this process computes its own
                out[s] = _run(worker, batches[s])
        finally:
            remote = self.remote.collect()  # a local failure still drains the round, so the channel stays in step
        for s, partial in zip(self.remote_shards, remote):
            out[s] = partial
        return out

    def abort(self) -> None:
        self.remote.abort()

    def close(self) -> None:
        self.remote.close()


def _run(worker: ShardWorker, batch: RoutedBatch | None) -> torch.Tensor | None:
    return None if batch is None else worker.run(batch)

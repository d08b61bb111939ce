"""The transport of single-process mode: the shards are workers in this process, called in turn."""

from __future__ import annotations

import torch

from cluster.parallel.dispatch import RoutedBatch
from cluster.parallel.shard_worker import ShardWorker


class InProcessTransport:
    max_rows = None

    def __init__(self, workers: list[ShardWorker]):
        self.workers = workers
        self.num_shards = len(workers)

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        return [None if b is None else w.run(b) for w, b in zip(self.workers, batches)]

    def close(self) -> None:
        pass

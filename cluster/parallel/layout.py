"""Where one serving unit's processes sit: the replica, each expert shard, and the channel ranks between them.

The one rule both the planner (`placement.plan_placement`, `moe-cluster plan`) and Serve's reservation
(`cluster.serve.unit`: bundles, actor options) derive from, so what the plan prints is what a unit reserves.

On GPUs NCCL refuses two ranks on one device ("Duplicate GPU detected"), so no GPU holds two channel ranks:
- `gpus == shards` (the default): the replica shares GPU 0 with shard 0, whose experts run inside the replica's
  process (a local worker, no channel rank); shards 1..S-1 are channel ranks 1..S-1, a GPU each.
- `gpus > shards`: the replica takes GPU S, the first free one, and every shard is a channel rank (1..S). GPUs past
  S hold nothing, and a unit does not reserve them.
On CPU every shard is a process of its own (channel ranks 1..S), as before. The rule above exists only because of
NCCL's one rank per device; gloo and shared memory take any number of ranks on one machine. A shard process gets its
own torch thread pool (cores / shards) and is restarted by Ray without touching the replica, and this is the layout
the CPU benchmarks (benchmarks/RESULTS.md) and the one-process-per-shard checks of tests/test_distributed.py measure.

Bundles follow the ranks: bundle 0 is the replica's (with any shard running in its process), bundle r holds the
shard of channel rank r.

Data-parallel attention (`attention_ranks` R > 1, DESIGN.md "every GPU attends"): R ranks, each an attention/router
engine with its own requests and KV cache holding shard r of the experts, exchange every MoE layer's tokens
(`cluster.parallel.all_to_all`). Rank r runs on GPU r (on CPU, a process each) in bundle r + 1; bundle 0 is the
AttentionRouter replica that spreads requests over the ranks and supervises them, and holds no GPU, so that every
rank is alike (a lost rank never takes the replica with it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnitLayout:
    """One unit's processes. Legend: S = shards."""

    device: str  # "cuda" | "cpu"
    replica_gpu: int | None  # None on CPU
    shard_gpus: tuple[int | None, ...]  # [S] None on CPU
    channel_ranks: tuple[int | None, ...]  # [S] None: the shard runs in the replica's process (rank 0 is the replica)
    attention_ranks: int = 1  # R > 1: data-parallel attention, shard r held by rank r (channel_ranks unused)

    @property
    def data_parallel(self) -> bool:
        return self.attention_ranks > 1

    @property
    def num_shards(self) -> int:
        return len(self.channel_ranks)

    @property
    def local_shards(self) -> tuple[int, ...]:
        """Shards whose experts run in the replica's process."""
        return tuple(s for s, r in enumerate(self.channel_ranks) if r is None)

    @property
    def remote_shards(self) -> tuple[int, ...]:
        """Shards of their own process, in channel-rank order (rank i + 1 is `remote_shards[i]`)."""
        return tuple(sorted((s for s, r in enumerate(self.channel_ranks) if r is not None),
                            key=lambda s: self.channel_ranks[s]))

    @property
    def num_gpus(self) -> int:
        """GPUs the unit uses (and reserves): 0 on CPU."""
        if self.replica_gpu is None:
            return 0
        return self.attention_ranks if self.data_parallel else len({self.replica_gpu, *self.shard_gpus})

    @property
    def strategy(self) -> str:
        """STRICT_PACK on GPUs: one unit never spans two nodes by accident (NCCL and the planner assume one node)."""
        return "STRICT_PACK" if self.device == "cuda" else "PACK"

    def shard_at_rank(self, rank: int) -> int:
        return self.channel_ranks.index(rank)

    def bundle_index(self, shard: int) -> int:
        """The placement-group bundle `shard` runs in: 0 (the replica's) for a local shard, else its channel rank."""
        return self.channel_ranks[shard] or 0

    def bundles(self, replica_cpus: float, shard_cpus: float) -> list[dict[str, float]]:
        """Ray placement-group bundles: the replica's, then one per channel rank; a whole GPU each on CUDA. Data
        parallel: the replica's (no GPU), then one per attention rank (`replica_cpus` and a GPU each)."""
        gpu = {"GPU": 1} if self.device == "cuda" else {}
        if self.data_parallel:
            return [{"CPU": replica_cpus}] + [{"CPU": replica_cpus, **gpu} for _ in range(self.attention_ranks)]
        return [{"CPU": replica_cpus, **gpu}] + [{"CPU": shard_cpus, **gpu} for _ in self.remote_shards]


def unit_layout(num_shards: int, device: str, num_gpus: int | None = None, attention_ranks: int = 1) -> UnitLayout:
    """The layout of `num_shards` shards (0: a dense model) on `device`; `num_gpus` (CUDA) defaults to one a shard.
    `attention_ranks` R > 1: data-parallel attention, one shard per rank (so `num_shards` must be R), rank r on GPU r.
    """
    if num_shards < 0:
        raise ValueError(f"num_shards must be >= 0, got {num_shards}")
    if attention_ranks < 1:
        raise ValueError(f"attention_ranks must be >= 1, got {attention_ranks}")
    if attention_ranks > 1:
        return _data_parallel_layout(num_shards, device, num_gpus, attention_ranks)
    if device != "cuda":
        return UnitLayout(device, None, (None,) * num_shards, tuple(range(1, num_shards + 1)))
    gpus = max(num_shards, 1) if num_gpus is None else num_gpus
    if gpus < max(num_shards, 1):
        raise ValueError(f"{num_shards} shards on {gpus} GPUs: each shard needs a GPU of its own")
    shard_gpus = tuple(range(num_shards))
    if gpus > num_shards:  # a free GPU: the replica takes the first one, every shard is a channel rank
        return UnitLayout(device, num_shards, shard_gpus, tuple(range(1, num_shards + 1)))
    # The replica shares GPU 0 with shard 0: shard 0 runs in its process, the others are ranks 1..S-1.
    return UnitLayout(device, 0, shard_gpus, (None,) + tuple(range(1, num_shards)))


def _data_parallel_layout(num_shards: int, device: str, num_gpus: int | None, ranks: int) -> UnitLayout:
    if num_shards != ranks:
        raise ValueError(f"attention_ranks={ranks} holds one expert shard on each rank: set shards to {ranks} "
                         f"(got {num_shards}{', a dense model' if num_shards == 0 else ''})")
    if device != "cuda":
        return UnitLayout(device, None, (None,) * ranks, (None,) * ranks, ranks)
    if num_gpus not in (None, ranks):
        raise ValueError(f"{ranks} attention ranks take {ranks} GPUs, one each; got gpus={num_gpus}")
    return UnitLayout(device, 0, tuple(range(ranks)), (None,) * ranks, ranks)

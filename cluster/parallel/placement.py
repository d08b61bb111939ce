"""Where experts live: the expert -> shard map and the per-GPU memory plan (computed, never hard-coded)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from cluster.checkpoint.names import dense_tensor_shapes, expert_tensor_shapes
from cluster.config import ModelConfig
from cluster.kernels.fp8 import fp8_matrix_bytes
from cluster.parallel.layout import UnitLayout, unit_layout


def assign_experts(num_experts: int, num_shards: int) -> list[tuple[int, ...]]:
    """Contiguous, balanced groups: 8 experts on 3 shards -> (0, 1, 2), (3, 4, 5), (6, 7)."""
    if num_shards < 1:
        raise ValueError(f"need at least one expert shard, got {num_shards}")
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for {num_experts} experts: each shard must hold at least one expert")
    base, extra = divmod(num_experts, num_shards)
    groups, start = [], 0
    for s in range(num_shards):
        size = base + (s < extra)
        groups.append(tuple(range(start, start + size)))
        start += size
    return groups


def expert_owners(groups: Sequence[tuple[int, ...]]) -> list[int]:
    """[num_experts]: the shard index holding each expert."""
    owners = [-1] * sum(len(g) for g in groups)
    for shard, experts in enumerate(groups):
        for e in experts:
            owners[e] = shard
    return owners


# ---------------------------------------------------------------------------------------------------------------------
# Placement planner: which GPU holds what, and does it fit (computed from config.json alone, before starting anything).
# ---------------------------------------------------------------------------------------------------------------------

GB = 10**9
GIB = 2**30


class PlacementError(ValueError):
    """A layout that cannot run (or bad planner arguments); the message says why, with numbers."""


@dataclass(frozen=True)
class Shard:
    """One ExpertShard: a group of experts of every layer."""

    index: int
    experts: tuple[int, ...]
    gpu: int | None  # None: a CPU shard
    weight_bytes: int
    channel_rank: int | None = None  # None: its experts run in the replica's process (sharing the replica's GPU)


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes planned on one device: a GPU, or (CPU plan) the host memory of one shard or of the replica."""

    device: str  # "GPU 0", "CPU shard 1", "CPU replica"
    gpu: int | None
    expert_bytes: int
    replica_bytes: int  # every non-expert tensor, if the attention/router replica lives here
    usable_bytes: int | None  # gpu_memory * utilization; None on CPU (not checked)
    kv_bytes: int = 0  # KV-cache room (the replica's GPU only)

    @property
    def weight_bytes(self) -> int:
        return self.expert_bytes + self.replica_bytes

    @property
    def free_bytes(self) -> int | None:
        """Usable bytes left after weights and KV room; None on CPU."""
        return None if self.usable_bytes is None else self.usable_bytes - self.weight_bytes - self.kv_bytes


@dataclass(frozen=True)
class Placement:
    """One serving unit: the attention/router replica + expert shards, and the memory each device needs.

    `layout` is the rule Serve reserves the unit by (`cluster.parallel.layout`): which shard runs in the replica's
    process and which processes are channel ranks, on which GPU.
    """

    config: ModelConfig
    dtype_bytes: int
    shards: tuple[Shard, ...]
    replica_gpu: int | None  # None: the replica runs on CPU
    replica_bytes: int
    memory: tuple[DeviceMemory, ...]  # one row per GPU (GPU plan) or per shard + replica (CPU plan)
    kv_bytes_per_token: int
    kv_tokens: int | None  # tokens the KV room holds (data-parallel: summed over the ranks); None on CPU
    gpu_memory: int | None
    gpu_memory_utilization: float
    layout: UnitLayout
    quantization: str | None = None  # the experts': None (dtype_bytes like the rest) or "fp8"

    @property
    def num_gpus(self) -> int:
        return 0 if self.replica_gpu is None else sum(1 for m in self.memory if m.gpu is not None)

    def expert_owners(self) -> list[int]:
        """[num_experts]: the shard index holding each expert ([] for a dense model)."""
        return expert_owners([s.experts for s in self.shards])

    def format(self) -> str:
        """A readable table: expert -> shard -> device, then memory per device in GB."""
        return "\n".join(_header(self) + _expert_map(self) + _processes(self) + _memory_table(self) + _kv_line(self))


def dense_weight_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes of every non-expert tensor (what the attention/router replica loads; the whole model if dense)."""
    return _tensor_bytes(dense_tensor_shapes(config).values(), dtype_bytes)


def expert_weight_bytes(config: ModelConfig, experts: Sequence[int], dtype_bytes: int = 2,
                        quantization: str | None = None) -> int:
    """Bytes of the given experts in every layer (w1, w2, w3): `dtype_bytes` a weight, or in FP8 one byte a weight
    and a float32 scale per output channel."""
    shapes = expert_tensor_shapes(config, list(experts)).values()
    if quantization == "fp8":
        return sum(fp8_matrix_bytes(s) for s in shapes)
    if quantization is not None:
        raise PlacementError(f"unknown quantization {quantization!r}")
    return _tensor_bytes(shapes, dtype_bytes)


def plan_placement(config: ModelConfig, num_gpus: int, gpu_memory: int | None = None, dtype_bytes: int = 2,
                   num_shards: int | None = None, gpu_memory_utilization: float = 0.9,
                   min_kv_tokens: int | None = None, quantization: str | None = None,
                   attention_ranks: int = 1) -> Placement:
    """Place one serving unit on `num_gpus` GPUs of `gpu_memory` bytes each, or refuse with PlacementError.

    Shards default to min(num_gpus, num_experts), shard i on GPU i; the replica shares GPU 0 with shard 0 (whose
    experts then run in the replica's process: no GPU holds two channel ranks) unless a GPU is left free, then it
    takes the first free one (`cluster.parallel.layout`). A dense model has no shards: the replica holds it on GPU 0.
    The KV cache gets all usable room left on the replica's GPU and must hold `min_kv_tokens` (default: one full
    context). Activations are not counted: they live in the (1 - utilization) headroom. `quantization` "fp8" counts
    the experts in FP8 (the rest stays at `dtype_bytes`).
    `attention_ranks` R > 1 plans data-parallel attention (`cluster.parallel.layout`): R ranks, rank r on GPU r with
    every non-expert tensor, shard r of the experts and a KV cache of its own in the room left there; the node's KV
    is the sum over its GPUs, and each rank's must hold `min_kv_tokens`.
    num_gpus=0 plans `num_shards` CPU shards instead, reporting host bytes and never refusing for memory.
    """
    if attention_ranks != 1:
        num_shards = _check_ranks(config, num_gpus, num_shards, attention_ranks)
    _check_args(config, num_gpus, gpu_memory, dtype_bytes, num_shards, gpu_memory_utilization, min_kv_tokens)
    if num_shards is None:
        num_shards = min(num_gpus, config.num_experts)
    groups = assign_experts(config.num_experts, num_shards) if config.is_moe else []
    replica_bytes = dense_weight_bytes(config, dtype_bytes)
    per_token = config.kv_bytes_per_token(dtype_bytes)
    layout = unit_layout(len(groups), "cuda" if num_gpus else "cpu", num_gpus or None, attention_ranks)
    shards = tuple(Shard(i, g, layout.shard_gpus[i], expert_weight_bytes(config, g, dtype_bytes, quantization),
                         layout.channel_ranks[i]) for i, g in enumerate(groups))
    if num_gpus == 0:
        return _cpu_plan(config, dtype_bytes, shards, replica_bytes, per_token, layout, quantization)

    assert gpu_memory is not None and layout.replica_gpu is not None  # _check_args; a GPU layout
    usable = int(gpu_memory * gpu_memory_utilization)
    replica_gpu = layout.replica_gpu
    attending = set(range(num_gpus)) if layout.data_parallel else {replica_gpu}  # GPUs with a KV cache
    memory = []
    for gpu in range(num_gpus):
        experts = sum(s.weight_bytes for s in shards if s.gpu == gpu)
        dense = replica_bytes if gpu in attending else 0
        row = DeviceMemory(f"GPU {gpu}", gpu, experts, dense, usable)
        _check_weights_fit(row, shards, gpu_memory, gpu_memory_utilization)
        if gpu in attending:
            row = replace(row, kv_bytes=usable - row.weight_bytes)
        memory.append(row)
    for gpu in sorted(attending):
        kv_bytes = memory[gpu].kv_bytes
        _check_kv_fits(config, gpu, kv_bytes, kv_bytes // per_token, per_token, min_kv_tokens)
    kv_tokens = sum(memory[gpu].kv_bytes // per_token for gpu in attending)
    return Placement(config, dtype_bytes, shards, replica_gpu, replica_bytes, tuple(memory), per_token, kv_tokens,
                     gpu_memory, gpu_memory_utilization, layout, quantization)


def _cpu_plan(config: ModelConfig, dtype_bytes: int, shards: tuple[Shard, ...], replica_bytes: int,
              per_token: int, layout: UnitLayout, quantization: str | None) -> Placement:
    """CPU shards (gpu None): host bytes per shard and for the replica (per rank, data-parallel); nothing is refused
    for memory."""
    if layout.data_parallel:
        memory = tuple(DeviceMemory(f"CPU rank {s.index}", None, s.weight_bytes, replica_bytes, None) for s in shards)
    else:
        memory = tuple(DeviceMemory(f"CPU shard {s.index}", None, s.weight_bytes, 0, None) for s in shards)
        memory += (DeviceMemory("CPU replica", None, 0, replica_bytes, None),)
    return Placement(config, dtype_bytes, shards, None, replica_bytes, memory, per_token, None, None, 1.0, layout,
                     quantization)


def _check_args(config: ModelConfig, num_gpus: int, gpu_memory: int | None, dtype_bytes: int,
                num_shards: int | None, utilization: float, min_kv_tokens: int | None) -> None:
    if num_gpus < 0 or (num_gpus == 0 and num_shards is None and config.is_moe):
        raise PlacementError(f"need at least one GPU (or num_gpus=0 with num_shards for CPU shards), got {num_gpus}")
    if dtype_bytes < 1:
        raise PlacementError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
    if min_kv_tokens is not None and min_kv_tokens < 0:
        raise PlacementError(f"min_kv_tokens must be >= 0, got {min_kv_tokens}")
    if num_gpus > 0:
        if gpu_memory is None or gpu_memory <= 0:
            raise PlacementError(f"gpu_memory must be a positive number of bytes, got {gpu_memory}")
        if not 0 < utilization <= 1:
            raise PlacementError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    if num_shards is None:
        return
    if not config.is_moe:
        if num_shards:
            raise PlacementError(f"a dense model has no experts to shard, got num_shards={num_shards}")
        return
    if num_shards < 1:
        raise PlacementError(f"need at least one expert shard, got {num_shards}")
    if num_shards > config.num_experts:
        raise PlacementError(f"{num_shards} shards for {config.num_experts} experts: each shard must hold at least "
                             "one expert")
    if num_gpus and num_shards > num_gpus:
        raise PlacementError(f"{num_shards} shards on {num_gpus} GPUs: each shard needs a GPU of its own")


def _check_ranks(config: ModelConfig, num_gpus: int, num_shards: int | None, ranks: int) -> int:
    """The shards of a data-parallel plan (one per rank), or PlacementError."""
    if ranks < 1:
        raise PlacementError(f"attention_ranks must be >= 1, got {ranks}")
    if not config.is_moe:
        raise PlacementError("data-parallel attention exchanges experts' tokens: a dense model has none (serve more "
                             "units instead)")
    if ranks > config.num_experts:
        raise PlacementError(f"{ranks} attention ranks for {config.num_experts} experts: each rank holds a shard")
    if num_shards not in (None, ranks):
        raise PlacementError(f"{ranks} attention ranks hold one expert shard each: shards must be {ranks}, "
                             f"not {num_shards}")
    if num_gpus not in (0, ranks):
        raise PlacementError(f"{ranks} attention ranks take {ranks} GPUs, one each; got {num_gpus}")
    return ranks


def _check_weights_fit(row: DeviceMemory, shards: tuple[Shard, ...], gpu_memory: int, utilization: float) -> None:
    assert row.usable_bytes is not None
    if row.weight_bytes <= row.usable_bytes:
        return
    held = [f"shard {s.index} (experts {_ids(s.experts)}: {_gb(s.weight_bytes)})" for s in shards if s.gpu == row.gpu]
    if row.replica_bytes:
        held.append(f"the attention/router replica ({_gb(row.replica_bytes)})")
    # A dense model does not split, nor has experts to hold in FP8.
    hint = "more GPUs, bigger GPUs, a smaller dtype or FP8 experts" if shards else "a bigger GPU or a smaller dtype"
    raise PlacementError(f"{row.device} needs {_gb(row.weight_bytes)} of weights but only {_gb(row.usable_bytes)} of "
                         f"{_gb(gpu_memory)} is usable (utilization {utilization:g}); it holds {' + '.join(held)}. "
                         f"Use {hint}")


def _check_kv_fits(config: ModelConfig, gpu: int, kv_bytes: int, kv_tokens: int, per_token: int,
                   min_kv_tokens: int | None) -> None:
    context = config.max_position_embeddings
    need = context if min_kv_tokens is None else min_kv_tokens
    if kv_tokens >= need:
        return
    what = f"one full context of {need:,} tokens" if need == context else f"the {need:,} tokens asked for"
    raise PlacementError(f"the KV cache room on GPU {gpu} holds {kv_tokens:,} tokens ({_gb(kv_bytes)} at "
                         f"{per_token:,} bytes per token), fewer than {what}")


def _tensor_bytes(shapes: Iterable[tuple[int, ...]], dtype_bytes: int) -> int:
    return sum(math.prod(s) for s in shapes) * dtype_bytes


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.1f} GB"


def _ids(experts: Sequence[int]) -> str:
    return ", ".join(map(str, experts))


def _header(p: Placement) -> list[str]:
    c = p.config
    model = f"{c.num_experts} experts (top {c.experts_per_token}) in {len(p.shards)} shard(s)" if c.is_moe else "dense"
    where = "CPU" if p.gpu_memory is None else (
        f"{p.num_gpus} GPU(s) of {_gb(p.gpu_memory)} ({p.gpu_memory / GIB:.1f} GiB)")
    experts = " (experts in FP8: 1 byte/param + a float32 scale per output channel)" if p.quantization else ""
    return [f"placement: {c.num_layers} layers, {model}, {p.dtype_bytes} bytes/param{experts}, on {where}"]


def _expert_map(p: Placement) -> list[str]:
    dev = "CPU" if p.replica_gpu is None else "GPU {}"
    lines = ["", "expert -> shard -> device"]
    lines += [f"  expert {e:>3} -> shard {s.index:>3} -> {dev.format(s.gpu)}" for s in p.shards for e in s.experts]
    if p.layout.data_parallel:
        where = "CPU" if p.replica_gpu is None else f"GPUs 0-{p.layout.attention_ranks - 1}"
        lines.append(f"  attention/router ({_gb(p.replica_bytes)}) -> every rank ({where})")
    else:
        lines.append(f"  attention/router replica ({_gb(p.replica_bytes)}) -> {dev.format(p.replica_gpu)}")
    return lines


def _processes(p: Placement) -> list[str]:
    """The channel's ranks: one process each, and no GPU holding two (NCCL refuses it)."""
    dev = "CPU" if p.replica_gpu is None else "GPU {}"
    if p.layout.data_parallel:
        return ["", "attention rank -> process -> device",
                *(f"  rank {s.index:>3} -> attention + KV cache + shard {s.index} -> {dev.format(s.gpu)}"
                  for s in p.shards),
                "  the AttentionRouter replica spreads requests over the ranks (no GPU)"]
    local = [s.index for s in p.shards if s.channel_rank is None]
    within = f" + the experts of shard {_ids(local)} (same process)" if local else ""
    lines = ["", "channel rank -> process -> device",
             f"  rank {0:>3} -> attention/router replica{within} -> {dev.format(p.replica_gpu)}"]
    lines += [f"  rank {s.channel_rank:>3} -> shard {s.index} -> {dev.format(s.gpu)}"
              for s in sorted(p.shards, key=lambda s: s.channel_rank or 0) if s.channel_rank is not None]
    return lines


def _memory_table(p: Placement) -> list[str]:
    cols = ("device", "experts GB", "replica GB", "weights GB", "KV room GB", "free GB", "usable GB")
    rows = [(m.device,) + tuple("-" if b is None else f"{b / GB:.1f}" for b in (
        m.expert_bytes, m.replica_bytes, m.weight_bytes, m.kv_bytes, m.free_bytes, m.usable_bytes)) for m in p.memory]
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def fmt(r: tuple[str, ...]) -> str:  # device left-aligned, numbers right-aligned
        return "  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    title = "memory per device" if p.gpu_memory is None else (
        f"memory per GPU (usable = {p.gpu_memory / GB:.1f} GB x {p.gpu_memory_utilization:g})")
    return ["", title, fmt(cols), *map(fmt, rows)]


def _kv_line(p: Placement) -> list[str]:
    if p.kv_tokens is None:
        return ["", f"KV cache: {p.kv_bytes_per_token:,} bytes/token, sized by the engine config on CPU"]
    per = f"{p.kv_bytes_per_token:,} bytes/token; context {p.config.max_position_embeddings:,}"
    if p.layout.data_parallel:
        rooms = [m.kv_bytes for m in p.memory if m.gpu is not None]
        return ["", f"KV cache: {_gb(min(rooms))} or more on each of {len(rooms)} GPUs (one rank each) = "
                    f"{min(rooms) // p.kv_bytes_per_token:,}+ tokens a rank, {p.kv_tokens:,} tokens in all ({per})"]
    room = p.memory[p.replica_gpu].kv_bytes
    return ["", f"KV cache: {_gb(room)} on GPU {p.replica_gpu} = {p.kv_tokens:,} tokens ({per})"]

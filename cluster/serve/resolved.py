"""`ResolvedArgs`: a serving unit's settings with every `auto` decided and the checkpoint's config read, once.

`resolve(args)` makes it in each process that serves: where `moe-cluster serve` starts, and in each Serve replica
(on its own node, where the checkpoint is). Every builder of that process takes it, so no default is decided twice.
Where the app is built there may be no checkpoint (a cluster's head): `planned_layout` reserves a unit from the
settings alone, and `resolve_planned` checks a replica's checkpoint against that reservation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.api.limits import APILimits
from cluster.checkpoint.weights import model_directory
from cluster.config import ModelConfig, expert_quantization
from cluster.dtype import resolve_dtype
from cluster.engine.config import EngineConfig
from cluster.engine.sampling_params import SamplingDefaults
from cluster.moe.backend import backend_name
from cluster.parallel.layout import UnitLayout, unit_layout
from cluster.parallel.placement import assign_experts
from cluster.serve.args import ServeArgs
from cluster.tokenizer import resolve_tokenizer_version


@dataclass(frozen=True)
class ResolvedArgs:
    args: ServeArgs  # as given and validated: the plain settings (CPUs, timeouts, backends by name) are read here
    model_dir: Path  # absolute
    model_name: str  # what clients send as `model`
    config: ModelConfig
    device: str  # "cuda" | "cpu"
    dtype: torch.dtype
    quantization: str | None  # the experts': None (in `dtype`) or "fp8" (asked for, or the checkpoint's own)
    tokenizer_version: str
    sampling: SamplingDefaults  # for the parameters a request leaves out
    moe_backend: str  # the expert kernels, by name ("triton", "cpu" or "torch")
    shard_groups: tuple[tuple[int, ...], ...]  # [S] the experts of each shard; () for a dense model
    layout: UnitLayout
    engine: EngineConfig
    api: APILimits  # what the HTTP API accepts from one request

    @property
    def num_shards(self) -> int:
        return len(self.shard_groups)

    @property
    def moe_kernel(self) -> str | None:
        """The expert kernels `/health` names; None for a dense model, which has no experts."""
        return self.moe_backend if self.num_shards else None


def resolve(args: ServeArgs) -> ResolvedArgs:
    """Decide every `auto` for this machine and read the checkpoint's config.json, once (writing the embedded
    default checkpoint first when it is the one asked for and absent)."""
    model_dir = model_directory(args.model, args.load_format).resolve()
    config = ModelConfig.from_file(model_dir)
    device = resolved_device(args)
    layout = unit_layout_of(args, config, device)
    if layout.data_parallel and args.channel != "auto" and (args.channel == "nccl") != (device == "cuda"):
        raise ValueError(f"channel={args.channel} for attention ranks on {device}: they exchange over "
                         f"{'nccl' if device == 'cuda' else 'shm or gloo'} there (or set auto)")
    cuda_graphs = args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and device == "cuda")
    if cuda_graphs and device != "cuda":
        raise ValueError("cuda_graphs=on needs a CUDA device")
    engine = EngineConfig(kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          prefill_budget_beside_decodes=args.prefill_budget_beside_decodes,
                          step_cost=_step_cost(args.step_cost, device),
                          max_waiting=args.max_waiting, max_n=args.max_n,
                          enable_prefix_caching=args.enable_prefix_caching,
                          attention_backend=args.attention_backend, cuda_graphs=cuda_graphs,
                          async_scheduling=args.async_scheduling == "on" or (args.async_scheduling == "auto"
                                                                             and device == "cuda"))
    api = api_limits(args)
    groups = assign_experts(config.num_experts, layout.num_shards) if layout.num_shards else []
    return ResolvedArgs(args=args, model_dir=model_dir, model_name=args.served_model_name or model_dir.name,
                        config=config, device=device, dtype=resolve_dtype(args.dtype, device),
                        quantization=expert_quantization(config, args.quantization),
                        tokenizer_version=resolve_tokenizer_version(config, args.tokenizer),
                        sampling=SamplingDefaults.for_model(config),
                        moe_backend=backend_name(args.moe_backend, device) if groups else args.moe_backend,
                        shard_groups=tuple(groups), layout=layout, engine=engine, api=api)


def api_limits(args: ServeArgs) -> APILimits:
    """The HTTP API's bounds on one request (and, --no-ray, on connections), from `args`."""
    return APILimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(APILimits)})


def resolve_planned(args: ServeArgs) -> ResolvedArgs:
    """`resolve(args)` where a replica runs (config.json read there), checked against what the cluster reserved for
    the unit from the settings alone (`planned_layout`)."""
    return check_planned(args, resolve(args))


def check_planned(args: ServeArgs, resolved: ResolvedArgs) -> ResolvedArgs:
    """`resolved`, if its checkpoint's unit is the one `args` reserve; else a ValueError naming `shards`."""
    planned = planned_layout(args, resolved.device)
    if resolved.layout != planned:
        raise ValueError(f"{resolved.model_dir.name} needs {resolved.num_shards} expert shards, but the unit "
                         f"reserved {planned.num_shards}: set shards to {resolved.num_shards}")
    return resolved


def resolved_device(args: ServeArgs) -> str:
    """`args.device`, with auto decided for this machine."""
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def num_shards(args: ServeArgs, config: ModelConfig) -> int:
    """Shards actually started: none for a dense model."""
    if not config.is_moe:
        return 0
    if args.shards > config.num_experts:
        raise ValueError(f"{args.shards} shards for {config.num_experts} experts: each shard needs an expert")
    if args.shards == 0:
        raise ValueError(f"shards=0 is for a dense model; this one has {config.num_experts} experts")
    return args.shards


def unit_layout_of(args: ServeArgs, config: ModelConfig, device: str) -> UnitLayout:
    """Where the unit's replica and shards run (`cluster.parallel.layout`, the planner's rule too)."""
    return _layout(args, num_shards(args, config), device)


def planned_layout(args: ServeArgs, device: str) -> UnitLayout:
    """The layout from the settings alone, without the checkpoint: what a cluster reserves for a unit before any
    replica has read config.json (`shards` as given)."""
    return _layout(args, args.shards, device)


def _layout(args: ServeArgs, shards: int, device: str) -> UnitLayout:
    if args.attention_ranks > 1:
        return unit_layout(shards, device, args.gpus if device == "cuda" else None, args.attention_ranks)
    if device == "cuda" and args.gpus not in (None, max(shards, 1), shards + 1):
        raise ValueError(f"gpus={args.gpus} for {shards} shards: a unit uses {shards} GPUs (the replica sharing "
                         f"GPU 0) or {shards + 1} (the replica on its own)" if shards else
                         f"gpus={args.gpus} for a dense model: its unit is the replica, on one GPU")
    return unit_layout(shards, device, args.gpus if device == "cuda" else None)


def _step_cost(step_cost: str, device: str) -> str:
    """auto: measured on a CPU (where attention and the weights' matmuls run at rates FLOPs do not tell), flops on
    a GPU."""
    if step_cost != "auto":
        return step_cost
    return "measured" if device == "cpu" else "flops"

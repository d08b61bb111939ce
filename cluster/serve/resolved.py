"""`ResolvedArgs`: a serving unit's settings with every `auto` decided and the checkpoint's config read, once.

`ServeArgs.resolve()` makes it where the service starts; the Serve deployments receive it (pickled) and every
builder takes it, so no replica re-reads config.json or decides a default again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cluster.api.limits import APILimits
from cluster.config import ModelConfig
from cluster.engine.engine import EngineConfig
from cluster.engine.sampling_params import SamplingDefaults
from cluster.parallel.layout import UnitLayout

if TYPE_CHECKING:
    from cluster.serve.args import ServeArgs


@dataclass(frozen=True)
class ResolvedArgs:
    args: ServeArgs  # as given and validated: the plain settings (CPUs, timeouts, backends by name) are read here
    model_dir: Path  # absolute
    model_name: str  # what clients send as `model`
    config: ModelConfig
    device: str  # "cuda" | "cpu"
    dtype: torch.dtype
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

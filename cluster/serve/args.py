"""The serving unit's settings, validated once, shared by `moe-cluster serve`, `serve run` configs and KubeRay."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cluster.checkpoint.default import ensure_default_checkpoint
from cluster.config import ModelConfig
from cluster.model.dtype import resolve_dtype
from cluster.parallel.layout import UnitLayout, unit_layout


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="checkpoint directory; default: the embedded mini checkpoint")
    served_model_name: str | None = Field(None, description="the `model` name clients send; default: directory name")
    tokenizer: Literal["v1", "v2", "v3"] | None = None
    shards: int = Field(2, ge=1, description="expert shards of one unit (at most the number of experts)")
    units: int = Field(1, ge=1, description="AttentionRouter replicas, each with its own shards")
    gpus: int | None = Field(
        None, ge=1, description="GPUs of one unit on CUDA: `shards` (default; the replica shares GPU 0 with shard 0, "
                                "whose experts then run in the replica's process) or `shards` + 1 (the replica gets a "
                                "GPU of its own); as `moe-cluster plan --gpus`")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware multiplies bf16 natively (GPUs, CPUs with AVX512/AMX), "
                            "else fp32")
    moe_backend: Literal["auto", "cpu", "torch", "triton"] = "auto"
    attention_backend: Literal["auto", "triton", "cpu", "torch"] = Field(
        "auto", description="auto: triton on CUDA, the C decode kernel on x86 CPUs in fp32, else torch")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="capture decode steps in CUDA graphs per batch bucket (whole, or in pieces around "
                            "experts in other processes); auto: on for CUDA, never on CPU")
    channel: Literal["auto", "shm", "gloo", "nccl"] = Field(
        "auto", description="the per-layer token channel; auto: shm when a unit shares one machine on CPU, "
                            "else gloo on CPU and NCCL on GPU")
    kv_cache_bytes: int | None = Field(None, gt=0, description="default: 1 GiB on CPU, 90% of free memory on GPU")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=16)
    replica_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved for the AttentionRouter replica")
    shard_cpus: float = Field(0.25, gt=0, description="Ray CPUs reserved for each expert shard")
    ingress_cpus: float = Field(0.1, gt=0)
    shard_threads: int | None = Field(None, ge=1, description="torch threads per CPU shard; default: cores / shards")
    step_timeout_s: float = Field(120.0, gt=0, description="longest wait for a layer's replies from the shards; "
                                                            "a shard that misses it is restarted")
    recovery_timeout_s: float = Field(600.0, gt=0, description="how long a unit may take to bring a shard back")

    def model_dir(self) -> Path:
        """The checkpoint directory, writing the embedded default there on first use."""
        return Path(self.model) if self.model else ensure_default_checkpoint()

    def model_name(self) -> str:
        return self.served_model_name or self.model_dir().name

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_cuda_graphs(self, device: str) -> bool:
        if self.cuda_graphs == "on" and device != "cuda":
            raise ValueError("cuda_graphs=on needs a CUDA device")
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device == "cuda")

    def resolved_dtype(self, device: str) -> str:
        return resolve_dtype(self.dtype, device)

    def num_shards(self, config: ModelConfig) -> int:
        """Shards actually started: none for a dense model."""
        if not config.is_moe:
            return 0
        if self.shards > config.num_experts:
            raise ValueError(f"{self.shards} shards for {config.num_experts} experts: each shard needs an expert")
        return self.shards

    def layout(self, config: ModelConfig, device: str) -> UnitLayout:
        """Where the unit's replica and shards run (`cluster.parallel.layout`, the planner's rule too)."""
        shards = self.num_shards(config)
        if device == "cuda" and self.gpus not in (None, max(shards, 1), shards + 1):
            raise ValueError(f"gpus={self.gpus} for {shards} shards: a unit uses {shards} GPUs (the replica sharing "
                             f"GPU 0) or {shards + 1} (the replica on its own)" if shards else
                             f"gpus={self.gpus} for a dense model: its unit is the replica, on one GPU")
        return unit_layout(shards, device, self.gpus if device == "cuda" else None)

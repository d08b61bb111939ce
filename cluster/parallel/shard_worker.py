"""One expert shard's compute: its experts of every layer, and the MoE backend that runs routed batches."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.checkpoint.progress import ProgressCallback
from cluster.checkpoint.weights import open_weights
from cluster.config import ModelConfig
from cluster.model.loader import load_experts
from cluster.moe.backend import MoEBackend, get_backend
from cluster.moe.executor import warm_up_layers
from cluster.moe.weights import ExpertWeights
from cluster.parallel.dispatch import RoutedBatch


class ShardWorker:
    def __init__(self, layers: list[ExpertWeights], num_experts: int, backend: MoEBackend):
        self.layers = layers  # [num_layers], each this shard's experts of that layer
        self.num_experts = num_experts
        self.backend = backend
        self.prepared = [backend.prepare(w) for w in layers]  # the backend's layout, made once at load

    @classmethod
    def load(cls, directory: str | Path, config: ModelConfig, experts: tuple[int, ...], dtype: torch.dtype,
             device: torch.device | str, backend: str = "auto", progress: ProgressCallback | None = None,
             load_format: str = "safetensors", quantization: str | None = None) -> "ShardWorker":
        """Loads only `experts` (of every layer) of the model whose config the caller has already read (from the
        checkpoint in `directory`, or made up: `cluster.checkpoint.weights`); with quantization "fp8" (resolved by
        the caller) they are held in FP8, each shard quantizing only its own."""
        layers = load_experts(open_weights(directory, load_format), config, dtype, device, list(experts), progress,
                              quantization)
        return cls(layers, config.num_experts, get_backend(backend, device))

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """Compile the backend's kernels for every batch size up to `max_tokens` before serving (on a GPU; a no-op
        for backends that compile nothing). See `cluster.moe.executor.warm_up_layers`."""
        warm_up_layers(self.backend, self.layers, self.prepared, max_tokens, top_k, self.num_experts)

    @property
    def expert_ids(self) -> tuple[int, ...]:
        return self.layers[0].expert_ids if self.layers else ()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.layers)

    def run(self, batch: RoutedBatch) -> torch.Tensor:
        """-> [N, D] fp32: the batch's weighted sum over this shard's experts."""
        return self.backend(batch.x, self.prepared[batch.layer], batch.topk_ids, batch.topk_weights,
                            self.num_experts, out_dtype=torch.float32)

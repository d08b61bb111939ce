"""Builds models from their weights (a checkpoint's, or made up: `cluster.checkpoint.weights`): the dense part into
`CausalLM`, experts into stacked `ExpertWeights` (in the model's dtype, or FP8: `fp8_loader`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.checkpoint.names import EXPERT_PROJECTIONS, dense_tensor_shapes, expert_tensor, expert_tensor_shapes
from cluster.checkpoint.progress import ProgressCallback
from cluster.checkpoint.reader import CheckpointError
from cluster.checkpoint.weights import WeightSource, open_weights
from cluster.config import ModelConfig, expert_quantization
from cluster.dtype import resolve_dtype
from cluster.model.decoder import CausalLM
from cluster.model.fp8_loader import load_dense_tensors, load_fp8_experts
from cluster.moe.backend import get_backend
from cluster.moe.executor import LocalExpertExecutor
from cluster.moe.weights import ExpertWeights


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    bytes_loaded: int


def load_dense(reader: WeightSource, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
               progress: ProgressCallback | None = None) -> CausalLM:
    """Everything but the experts (embeddings, attention, norms, router gates, lm_head), in `dtype`; those an FP8
    checkpoint stores in FP8 are dequantized."""
    shapes = dense_tensor_shapes(config)
    if config.quantization:
        tensors = load_dense_tensors(reader, shapes, dtype, device, progress)
    else:
        tensors = reader.load(shapes, dtype, device, progress, label="loading attention weights")
    with torch.device("meta"):
        model = CausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"model and checkpoint disagree: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_experts(reader: WeightSource, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", experts: list[int] | None = None,
                 progress: ProgressCallback | None = None, quantization: str | None = None) -> list[ExpertWeights]:
    """Only the given experts (all by default) of every layer, stacked per layer: in `dtype`, or with quantization
    "fp8" (as resolved: `cluster.config.expert_quantization`) in FP8, computing in `dtype`."""
    experts = sorted(range(config.num_experts) if experts is None else set(experts))
    bad = [e for e in experts if not 0 <= e < config.num_experts]
    if bad:
        raise CheckpointError(f"expert ids {bad} are out of range: the model has {config.num_experts} experts")
    if quantization == "fp8":
        return load_fp8_experts(reader, config, dtype, device, experts, progress)
    if quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}")
    tensors = reader.load(expert_tensor_shapes(config, experts), dtype, device, progress, label="loading experts")
    layers = []
    for i in range(config.num_layers):
        w = {p: [tensors.pop(expert_tensor(i, e, p)) for e in experts] for p in EXPERT_PROJECTIONS}
        layers.append(ExpertWeights.stack(experts, w["w1"], w["w3"], w["w2"]))
    return layers


def load_model(directory: str | Path, dtype: str | torch.dtype = "fp32", device: torch.device | str = "cpu",
               backend: str = "auto", progress: ProgressCallback | None = None,
               load_format: str = "safetensors", quantization: str | None = None) -> LoadedModel:
    """The whole model in this process, experts run by a local executor; `dtype` a name, "auto" (for `device`, as
    `cluster.dtype.resolve_dtype`) or a torch.dtype; `quantization` "fp8" for FP8 experts (default: the
    checkpoint's own)."""
    config = ModelConfig.from_file(directory)
    reader = open_weights(directory, load_format)
    dtype = resolve_dtype(dtype, device)
    quantization = expert_quantization(config, quantization)
    model = load_dense(reader, config, dtype, device, progress)
    if config.is_moe:
        layers = load_experts(reader, config, dtype, device, progress=progress, quantization=quantization)
        model.attach_experts(LocalExpertExecutor(layers, config.num_experts, get_backend(backend, device)))
    return LoadedModel(model=model, config=config, bytes_loaded=reader.bytes_loaded)

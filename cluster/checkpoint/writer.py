"""Writes a random checkpoint of a given shape in the real HF layout (config.json + safetensors [+ index])."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.checkpoint.names import dense_tensor_shapes, expert_tensor_shapes
from cluster.checkpoint.random_weights import random_tensor
from cluster.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from cluster.config import ModelConfig
from cluster.dtype import parse_dtype


def write_random_checkpoint(directory: str | Path, config: ModelConfig, seed: int = 0,
                            dtype: str | torch.dtype = torch.bfloat16, max_shard_bytes: int = 2 * 10**9) -> Path:
    """Deterministic from `seed`: the same arguments write byte-identical tensors. Returns the directory."""
    dtype = parse_dtype(dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {**dense_tensor_shapes(config), **expert_tensor_shapes(config)}
    shards = _plan_shards(sorted(shapes), shapes, dtype.itemsize, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], gen).to(dtype) for name in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return directory


def _plan_shards(names: list[str], shapes: dict[str, tuple[int, ...]], itemsize: int,
                 max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = math.prod(shapes[name]) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards

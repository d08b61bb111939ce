"""Where a model's weights come from (`load_format`): the checkpoint's safetensors files, or made up on the device
(`random_weights`, seed `RANDOM_SEED`). With random weights `--model` may also name a shape (`presets`: tiny,
mini, mixtral-8x7b, mixtral-8x22b), which stands for a directory holding only its config.json, in the user's
cache: a full-size model then serves with no checkpoint at all."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from cluster.checkpoint.default import DEFAULT_PRESET, ensure_default_checkpoint
from cluster.checkpoint.presets import PRESETS
from cluster.checkpoint.progress import ProgressCallback
from cluster.checkpoint.random_weights import RandomWeights
from cluster.checkpoint.reader import CheckpointReader, StoredTensor
from cluster.config import ModelConfig
from cluster.user_cache import cache_root, private_directory

LOAD_FORMATS = ("safetensors", "random")
RANDOM_SEED = 0


class WeightSource(Protocol):
    bytes_loaded: int  # so far, over every `load`

    def stored(self, names: list[str]) -> dict[str, StoredTensor]:
        """How each named tensor is stored (dtype, shape); {} from a source that stores nothing (random weights)."""
        ...

    def load(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu",
             progress: ProgressCallback | None = None, label: str = "") -> dict[str, torch.Tensor]:
        """Exactly the named tensors, of these shapes, in `dtype` on `device`."""
        ...


def open_weights(directory: str | Path, load_format: str) -> WeightSource:
    if load_format == "safetensors":
        return CheckpointReader(directory)
    if load_format == "random":
        return RandomWeights(RANDOM_SEED)
    raise ValueError(f"unknown load format {load_format!r}: choose one of {', '.join(LOAD_FORMATS)}")


def model_directory(model: str | None, load_format: str) -> Path:
    """The directory `--model` stands for: a path; with random weights a shape's name too (its config-only
    directory); None, the embedded default (its checkpoint, or with random weights its shape)."""
    if load_format == "random" and (model is None or (model in PRESETS and not Path(model).is_dir())):
        return shape_directory(model or DEFAULT_PRESET)
    return Path(model) if model is not None else ensure_default_checkpoint()


def shape_directory(name: str, config: ModelConfig | None = None) -> Path:
    """A directory in the user's cache holding the config.json of the shape `name` (rewritten atomically when it
    differs): a preset's, or `config` under a name its caller chose (e.g. a preset with fewer layers)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):  # a key of PRESETS or a caller's label, never a path
        raise ValueError(f"not a shape name: {name!r}")
    directory = private_directory(cache_root() / "shapes" / name)
    text = json.dumps((config or PRESETS[name]).to_hf_dict(), indent=2) + "\n"
    target = directory / "config.json"
    if not target.is_file() or target.read_text() != text:
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return directory

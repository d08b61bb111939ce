"""Weights made up where they are used (`--load-format random`): a model of any shape serves, and a deployment can
be load-tested, before its checkpoint arrives (what other servers call a dummy load format).

Each tensor comes from its own generator, seeded from the run's seed and the tensor's name, on the target device:
nothing is read or written, a shard makes only its own experts, and every process makes the same values for a
name, so an expert-parallel unit computes what one process does. The scales are the embedded checkpoints'
(`random_tensor`), which keep activations O(1) through the layers.
"""

from __future__ import annotations

import hashlib
import math

import torch

from cluster.checkpoint.progress import ProgressCallback, default_progress
from cluster.checkpoint.reader import StoredTensor


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 values for the tensor `name`: norms near 1, embeddings N(0, 1), matrices N(0, 1 / fan-in)."""
    values = torch.randn(shape, generator=generator, device=device)
    if name.endswith("norm.weight"):
        return values.mul_(0.1).add_(1.0)
    if name.endswith("embed_tokens.weight"):
        return values
    return values.div_(math.sqrt(shape[-1]))


class RandomWeights:
    """The checkpoint reader's `load`, with made-up tensors."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.bytes_loaded = 0  # bytes made, in the dtype asked for

    def stored(self, names: list[str]) -> dict[str, StoredTensor]:
        """Nothing is stored: every tensor is made on request, in the dtype asked for."""
        return {}

    def load(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu",
             progress: ProgressCallback | None = None, label: str = "making random weights") -> dict[str, torch.Tensor]:
        total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        progress = progress or default_progress(label, total)
        device = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        done = 0
        for name in sorted(shapes):
            generator = torch.Generator(device).manual_seed(self._seed_of(name))
            out[name] = random_tensor(name, tuple(shapes[name]), generator, device).to(dtype)
            nbytes = out[name].numel() * dtype.itemsize
            done += nbytes
            self.bytes_loaded += nbytes
            if progress:
                progress(done, total)
        return out

    def _seed_of(self, name: str) -> int:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

"""Where the model's glue runs: RMSNorm (with the residual add before it), rotary and the router's top-k.

CUDA tensors take the fused Triton kernels of `cluster.kernels.glue` (one launch each instead of a string of small
torch ops); everything else runs the layers' own torch code, so the CPU path's arithmetic is the reference's, bit
for bit, and never loads the kernels (defining them there would fix Triton's interpreter-or-compiler choice). The
layers ask here, and only here, on every call.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch


def fused_glue(t: torch.Tensor) -> ModuleType | None:
    """`cluster.kernels.glue` when ops on `t` should take the fused kernels (a CUDA tensor, Triton installed), else
    None: the caller runs its torch code."""
    if not t.is_cuda or not _triton_installed():
        return None
    from cluster.kernels import glue  # defines the kernels: only once a CUDA tensor asks

    return glue


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None

"""Chooses the attention backend once, when the cache is built.

auto: CUDA -> triton; CPU fp32 with the C kernel built -> cpu (its decodes, torch for prefill); else torch.
An explicit name picks that backend anywhere (tests run triton on the CPU under the interpreter).
"""

from __future__ import annotations

import logging

import torch

from cluster.attention.backend import AttentionBackend
from cluster.attention.cpu_backend import CpuAttentionBackend, load_decode_kernel
from cluster.attention.torch_backend import DEFAULT_WORKSPACE_BYTES, TorchAttentionBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu", "torch")


def select_backend(name: str | None, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype, device: torch.device | str, use_kernel: bool = True,
                   workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> AttentionBackend:
    """name: one of BACKENDS (None = auto); use_kernel=False keeps auto off the C kernel."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    scale = head_dim ** -0.5
    if name == "auto":
        name = _auto(num_heads, num_kv_heads, head_dim, block_size, dtype, device, use_kernel)
    if name == "triton":
        from cluster.attention.triton_backend import TritonAttentionBackend  # imports Triton

        return TritonAttentionBackend(scale, device)
    fallback = TorchAttentionBackend(num_kv_heads, head_dim, block_size, dtype, device, scale, workspace_bytes)
    if name == "cpu":
        kernel = load_decode_kernel(num_heads, num_kv_heads, head_dim, block_size, dtype, device)
        if kernel is None:
            raise ValueError("the cpu attention backend needs the C kernel: x86 AVX2+FMA, a C compiler, a CPU fp32 "
                             "cache, G <= 16, Dh a multiple of 16 up to 256, a block size a multiple of 8 up to 64")
        return CpuAttentionBackend(kernel, num_heads, scale, fallback)
    return fallback


def _auto(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
          device: torch.device, use_kernel: bool) -> str:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            log.warning("Triton is not installed: attention on %s falls back to torch", device)
            return "torch"
        return "triton"
    if use_kernel and load_decode_kernel(num_heads, num_kv_heads, head_dim, block_size, dtype, device) is not None:
        return "cpu"
    return "torch"

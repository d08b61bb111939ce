"""The CPU backend: decodes through the C kernel `cluster/kernels/cpu/paged_attention.c`, prefill chunks in torch.

The kernel reads every key and value row once where it lives, where the torch path gathers them first (timings in
benchmarks/RESULTS.md); it needs AVX2 + FMA, a C compiler, fp32 and the shape limits below (they mirror its source).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.torch_backend import TorchAttentionBackend
from cluster.kernels.cpu_build import cpu_kernel_library

DecodeKernel = Callable[..., None]


def load_decode_kernel(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str) -> DecodeKernel | None:
    """The C decode kernel where it applies, else None."""
    group = num_heads // num_kv_heads
    fits = group <= 16 and head_dim % 16 == 0 and head_dim <= 256 and block_size % 8 == 0 and block_size <= 64
    if not (fits and torch.device(device).type == "cpu" and dtype == torch.float32):
        return None
    library = cpu_kernel_library()
    return None if library is None else library.paged_decode_attention


class CpuAttentionBackend:
    name = "cpu"
    graph_safe = False

    def __init__(self, kernel: DecodeKernel, num_heads: int, scale: float, prefill: TorchAttentionBackend):
        self.kernel = kernel
        self.num_heads = num_heads
        self.scale = scale
        self.torch = prefill
        self.tables = torch.empty(0, 0, dtype=torch.long)  # [num_decodes, NB] int64, as the kernel reads them
        self.contexts = torch.empty(0, dtype=torch.long)  # [num_decodes] int64

    def plan(self, meta: AttentionMetadata) -> None:
        nd = meta.num_decodes
        self.tables = meta.block_tables[:nd].to(torch.long).contiguous()
        self.contexts = meta.seq_lens[:nd].to(torch.long).contiguous()

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd].contiguous(), k_cache, v_cache, out[:nd])
        self.torch.prefill(q, k_cache, v_cache, meta, out)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        """q, out [B, H, Dh] (contiguous row slices) over k/v_cache [KV, N, bs, Dh] (contiguous)."""
        tables = self.tables
        kv_heads, num_blocks, bs, head_dim = k_cache.shape
        self.kernel(q.shape[0], self.num_heads, kv_heads, head_dim, bs, num_blocks, q.data_ptr(),
                    k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
                    self.contexts.data_ptr(), self.scale, out.data_ptr(), torch.get_num_threads())

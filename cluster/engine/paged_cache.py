"""The paged KV cache: K/V live in fixed-size blocks; each sequence reads them through its block table.

Implements the model's `KVCache` interface. It holds the storage and writes each step's new K/V rows into their
slots; how the rows are attended is the business of an attention backend (`cluster.attention`), chosen once here.
Before each forward the model runner lays the step out (`AttentionMetadata`): sequences decoding one token first,
shortest context first, then prefill chunks; `begin_step` hands it to the backend to plan. The cache holds nothing
else of a step: what the other layers need of it travels in the forward's context (`cluster.model.forward_context`).

Layout: head-major, k/v [L, KV, N + 1, bs, Dh]: one kv head's blocks are contiguous, which the torch backend's
gathers (one `index_select` per kv head) and the C kernel rely on; the Triton kernels take any strides. Block N is
scratch that no table names: the torch write sends padding tokens (slot -1) there, so skipping them needs no
host sync; the Triton write skips them outright.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.selector import select_backend
from cluster.attention.torch_backend import DEFAULT_WORKSPACE_BYTES
from cluster.config import ModelConfig


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return block_size * config.kv_bytes_per_token(dtype.itemsize)


class PagedKVCache:
    """k, v: [L, KV, N + 1, bs, Dh] (L = layers, N = usable blocks, bs = block size; block N is scratch)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", use_kernel: bool = True, backend: str | None = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        """backend: "triton", "cpu", "torch" or None/"auto" (see `cluster.attention.selector`); use_kernel=False
        keeps auto off the C decode kernel. workspace_bytes caps the torch backend's gathers."""
        shape = (config.num_layers, config.num_kv_heads, num_blocks + 1, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scale = config.head_dim ** -0.5
        self.backend = select_backend(backend, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                                      head_dim=config.head_dim, block_size=block_size, dtype=dtype, device=device,
                                      use_kernel=use_kernel, workspace_bytes=workspace_bytes)
        self._write = _triton_write() if self.backend.name == "triton" else _torch_write
        self.meta: AttentionMetadata | None = None

    @property
    def kernel(self) -> Callable[..., None] | None:
        """The C decode kernel when the cpu backend attends, else None."""
        return getattr(self.backend, "kernel", None)

    def begin_step(self, meta: AttentionMetadata) -> None:
        """Attend the coming forward's tokens as `meta` lays them out."""
        self.meta = meta
        self.backend.plan(meta)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, Dh]; k, v [T, KV, Dh] -> [T, H, Dh]."""
        kc, vc = self.k[layer], self.v[layer]  # [KV, N + 1, bs, Dh]
        self._write(k, v, kc, vc, self.meta.slot_mapping)
        return self.backend.forward(q, kc, vc, self.meta)


Writer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _torch_write(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> None:
    """Slot -1 indexes the last row, which is in the scratch block."""
    kv_heads, head_dim = kc.shape[0], kc.shape[3]
    kc.view(kv_heads, -1, head_dim)[:, slots] = k.transpose(0, 1)
    vc.view(kv_heads, -1, head_dim)[:, slots] = v.transpose(0, 1)


def _triton_write() -> Writer:
    from cluster.kernels.paged_attention import store_kv

    return store_kv

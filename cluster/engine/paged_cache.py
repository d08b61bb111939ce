"""The paged KV cache: K/V live in fixed-size blocks; each sequence reads them through its block table.

Implements the model's `KVCache` interface. Before each forward the model runner lays out the step
(`AttentionMetadata`); sequences decoding one token come first in the flat batch, shortest context first, prefill
chunks follow and are attended one by one (each is many tokens, so the loop costs little).

Decodes on x86 CPUs in fp32 go to the C kernel `cluster/kernels/cpu/paged_attention.c`, which reads every key and
value row once where it lives (~3x the torch path below). Elsewhere they are attended in torch, in up to
`decode_groups` groups of neighbouring lengths, each gathered and padded only to its own longest context: one group
padded to the batch's longest wastes about half the gathers and matmuls when lengths spread from 32 to 768 tokens.

Layout: head-major, k/v [L, KV, N, bs, Dh], so gathering a batch's blocks for one kv head is one contiguous
`index_select` and the gathered keys are already [KV, B, W, Dh] for batched matmuls. Gathers land in workspaces
kept across steps: a fresh tensor of this size costs more in page faults than the copy itself on CPU (measured
24 ms against 1.4 ms for 10 MB on 2 cores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cluster.config import ModelConfig
from cluster.kernels.cpu_build import cpu_kernel_library
from cluster.model.kv_cache import causal_attention


@dataclass
class AttentionMetadata:
    """Legend: T = new tokens, B = sequences, NB = widest block table."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, NB] long, padded with 0
    query_lens: list[int]  # new tokens per sequence; the first `num_decodes` are 1
    context_lens: list[int]  # tokens in the cache per sequence after this step
    num_decodes: int


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return block_size * kv_bytes_per_token(config, dtype.itemsize)


@dataclass(frozen=True)
class DecodeGroup:
    """Decoding sequences attended together. Legend: b = sequences in the group, W = its padded width."""

    rows: slice  # the group's sequences in the flat batch
    tables: torch.Tensor  # [b, W / bs] block tables cut to the group's width
    bias: torch.Tensor  # [1, b, 1, W] fp32: 0 inside each context, -inf past it


class PagedKVCache:
    """k, v: [L, KV, N, bs, Dh] (L = layers, N = blocks, bs = block size)."""

    decode_groups = 4
    min_group = 16  # fewer sequences than this in a group and the extra calls cost more than the padding saved

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", use_kernel: bool = True):
        shape = (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_heads = config.num_heads
        self.scale = config.head_dim ** -0.5
        self.kernel = _load_decode_kernel(config, block_size, self.k) if use_kernel else None
        self.meta: AttentionMetadata | None = None
        self.groups: list[DecodeGroup] = []
        self.decode_contexts = torch.empty(0, dtype=torch.long)  # [num_decodes], for the kernel
        self.decode_tables = torch.empty(0, 0, dtype=torch.long)  # [num_decodes, NB], for the kernel
        self._workspace = {"k": torch.empty(0, dtype=dtype, device=device),
                           "v": torch.empty(0, dtype=dtype, device=device)}

    def begin_step(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        nd = meta.num_decodes
        if self.kernel is not None:
            self.decode_contexts = torch.tensor(meta.context_lens[:nd], dtype=torch.long)
            self.decode_tables = meta.block_tables[:nd].to(torch.long).contiguous()
            return
        parts = max(1, min(self.decode_groups, nd // self.min_group))
        bounds = [nd * i // parts for i in range(parts + 1)] if nd else []
        self.groups = [self._decode_group(meta, a, b) for a, b in zip(bounds, bounds[1:])]

    def _decode_group(self, meta: AttentionMetadata, start: int, end: int) -> DecodeGroup:
        lens = meta.context_lens[start:end]
        blocks = -(-max(lens) // self.block_size)
        width = blocks * self.block_size
        device = self.k.device
        past = torch.arange(width, device=device)[None, :] >= torch.tensor(lens, device=device)[:, None]  # [b, W]
        bias = torch.zeros(past.shape, dtype=torch.float32, device=device).masked_fill_(past, float("-inf"))
        return DecodeGroup(slice(start, end), meta.block_tables[start:end, :blocks], bias[None, :, None, :])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        kc, vc = self.k[layer], self.v[layer]  # [KV, N, bs, Dh]
        kv_heads, head_dim = kc.shape[0], kc.shape[3]
        kc.view(kv_heads, -1, head_dim)[:, meta.slot_mapping] = k.transpose(0, 1)
        vc.view(kv_heads, -1, head_dim)[:, meta.slot_mapping] = v.transpose(0, 1)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if self.kernel is not None and nd:
            self._decode_kernel(q[:nd].contiguous(), kc, vc, out[:nd])
        for group in self.groups:
            out[group.rows] = self._decode(q[group.rows], kc, vc, group)
        offset = nd
        for i in range(nd, len(meta.query_lens)):
            n, total = meta.query_lens[i], meta.context_lens[i]
            table = meta.block_tables[i, :-(-total // self.block_size)]
            keys = self._gather("k", kc, table)[:, 0, :total].transpose(0, 1)  # [total, KV, Dh]
            values = self._gather("v", vc, table)[:, 0, :total].transpose(0, 1)
            out[offset:offset + n] = causal_attention(q[offset:offset + n], keys, values, total - n)
            offset += n
        return out

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        """One new token per sequence: q [b, H, Dh] -> [b, H, Dh] (G = query heads per kv head)."""
        b, heads, head_dim = q.shape
        kv_heads = kc.shape[0]
        keys = self._gather("k", kc, group.tables)  # [KV, b, W, Dh]
        values = self._gather("v", vc, group.tables)
        qg = q.view(b, kv_heads, heads // kv_heads, head_dim).transpose(0, 1)  # [KV, b, G, Dh]
        scores = torch.matmul(qg, keys.transpose(2, 3)).float()  # [KV, b, G, W]
        probs = scores.mul_(self.scale).add_(group.bias).softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).transpose(0, 1).reshape(b, heads, head_dim)

    def _decode_kernel(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor) -> None:
        """q, out [B, H, Dh] (contiguous row slices) over kc, vc [KV, N, bs, Dh]."""
        tables = self.decode_tables
        kv_heads, num_blocks, bs, head_dim = kc.shape
        self.kernel(q.shape[0], self.num_heads, kv_heads, head_dim, bs, num_blocks, q.data_ptr(), kc.data_ptr(),
                    vc.data_ptr(), tables.data_ptr(), tables.stride(0), self.decode_contexts.data_ptr(), self.scale,
                    out.data_ptr(), torch.get_num_threads())

    def _gather(self, name: str, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """cache [KV, N, bs, Dh], tables [B, NB] (or [NB]) -> [KV, B, NB*bs, Dh] in the reused workspace."""
        tables = tables.view(-1, tables.shape[-1])
        kv_heads, _, bs, head_dim = cache.shape
        b, nb = tables.shape
        need = kv_heads * b * nb * bs * head_dim
        if self._workspace[name].numel() < need:
            self._workspace[name] = torch.empty(need, dtype=cache.dtype, device=cache.device)
        work = self._workspace[name][:need].view(kv_heads, b * nb, bs, head_dim)
        flat = tables.flatten()
        for h in range(kv_heads):
            torch.index_select(cache[h], 0, flat, out=work[h])
        return work.view(kv_heads, b, nb * bs, head_dim)


def _load_decode_kernel(config: ModelConfig, block_size: int,
                        cache: torch.Tensor) -> Callable[..., None] | None:
    """The C decode kernel where it applies (its limits are in its source), else None."""
    group = config.num_heads // config.num_kv_heads
    fits = (group <= 16 and config.head_dim % 16 == 0 and config.head_dim <= 256 and block_size % 8 == 0
            and block_size <= 64)
    if not (fits and cache.device.type == "cpu" and cache.dtype == torch.float32):
        return None
    library = cpu_kernel_library()
    return None if library is None else library.paged_decode_attention

"""The paged KV cache: K/V live in fixed-size blocks; each sequence reads them through its block table.

Implements the model's `KVCache` interface. Before each forward the model runner lays out the step
(`AttentionMetadata`); sequences decoding one token come first in the flat batch and are attended in one batched
call, prefill chunks follow and are attended one by one (each is many tokens, so the loop costs little).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.config import ModelConfig
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


class PagedKVCache:
    """k, v: [L, N, block_size, KV, Dh] (L = layers, N = blocks)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.meta: AttentionMetadata | None = None
        self._decode_mask: torch.Tensor | None = None

    def begin_step(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        nd = meta.num_decodes
        if nd:
            width = meta.block_tables.shape[1] * self.block_size
            lens = torch.tensor(meta.context_lens[:nd], device=self.k.device)
            self._decode_mask = (torch.arange(width, device=self.k.device)[None, :] < lens[:, None])[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        kc, vc = self.k[layer], self.v[layer]  # [N, bs, KV, Dh]
        kv_heads, head_dim = kc.shape[2], kc.shape[3]
        kc.view(-1, kv_heads, head_dim)[meta.slot_mapping] = k
        vc.view(-1, kv_heads, head_dim)[meta.slot_mapping] = v
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            blocks = meta.block_tables[:nd].flatten()  # [nd*NB]; index_select copies whole blocks, fastest on CPU
            keys = kc.index_select(0, blocks).view(nd, -1, kv_heads, head_dim).transpose(1, 2)  # [nd, KV, NB*bs, Dh]
            values = vc.index_select(0, blocks).view(nd, -1, kv_heads, head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), keys, values, attn_mask=self._decode_mask,
                                               enable_gqa=True)  # [nd, H, 1, Dh]
            out[:nd] = o.squeeze(2)
        offset = nd
        for i in range(nd, len(meta.query_lens)):
            n, total = meta.query_lens[i], meta.context_lens[i]
            table = meta.block_tables[i, :-(-total // self.block_size)]
            keys = kc.index_select(0, table).flatten(0, 1)[:total]  # [total, KV, Dh]
            values = vc.index_select(0, table).flatten(0, 1)[:total]
            out[offset:offset + n] = causal_attention(q[offset:offset + n], keys, values, total - n)
            offset += n
        return out

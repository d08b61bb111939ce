"""Grouped-query self-attention; the cache behind `KVCache` decides where keys live and how they are read."""

from __future__ import annotations

import torch
from torch import nn

from cluster.config import ModelConfig
from cluster.model.kv_cache import KVCache
from cluster.model.layers import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [T, D], positions [T] -> [T, D]."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = cache.attend(self.layer, q, k, v)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, -1))

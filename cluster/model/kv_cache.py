"""The KV-cache interface attention talks to, and a contiguous implementation for single-process generation.

A forward pass runs over a flat batch of T new tokens from B sequences. Before it, the cache is told the layout
(`begin_step`); each attention layer then hands it the new q/k/v and gets the attention output back. The engine's
paged cache implements the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class KVCache(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v for `layer`; return causal attention of q over each sequence's cached + new keys.

        Legend: T = new tokens, H = query heads, KV = kv heads, Dh = head dim.
        q [T, H, Dh]; k, v [T, KV, Dh] -> [T, H, Dh].
        """
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, H, Dh] at positions start..start+n-1; k, v [start+n, KV, Dh] -> [n, H, Dh]."""
    n, total = q.shape[0], k.shape[0]
    mask = None  # square (a fresh prefill): the fused causal kernel needs no mask
    if start:
        mask = torch.arange(total, device=q.device) <= torch.arange(start, start + n, device=q.device)[:, None]
    # 4-D inputs: with 3-D ones SDPA on CPU falls back to its much slower math path.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=not start, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


class ContiguousKVCache:
    """Each sequence owns a slot of `max_len` contiguous positions per layer.

    k, v: [L, S, max_len, KV, Dh] (L = layers, S = slots).
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._step: list[tuple[int, int, int]] = []  # (slot, start, new tokens)

    def begin_step(self, slots: list[int], num_new: list[int]) -> torch.Tensor:
        """Lay out the next forward: sequence i lives in slots[i] and brings num_new[i] tokens. Returns positions [T]."""
        self._step = []
        positions = []
        for slot, n in zip(slots, num_new):
            start = self.lengths[slot]
            if start + n > self.max_len:
                raise ValueError(f"slot {slot} would hold {start + n} tokens, more than its {self.max_len}")
            self._step.append((slot, start, n))
            positions.append(torch.arange(start, start + n))
            self.lengths[slot] = start + n
        return torch.cat(positions).to(self.k.device)

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        offset = 0
        for slot, start, n in self._step:
            end = start + n
            self.k[layer, slot, start:end] = k[offset:offset + n]
            self.v[layer, slot, start:end] = v[offset:offset + n]
            out[offset:offset + n] = causal_attention(q[offset:offset + n], self.k[layer, slot, :end],
                                                      self.v[layer, slot, :end], start)
            offset += n
        return out

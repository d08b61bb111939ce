"""The Triton backend: paged decode (split-K) and causal prefill kernels reading the cache in place.

Graph-safe: `forward` reads the metadata's device tensors, its shapes and `num_decodes` (fixed for a decode-only
bucket), nothing else from the host; the number of context splits depends on shapes only.
"""

from __future__ import annotations

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.kernels.paged_attention import decode_split_counts, decode_splits, paged_decode, paged_prefill


class TritonAttentionBackend:
    name = "triton"
    graph_safe = True

    def __init__(self, scale: float, device: torch.device | str, num_splits: int | None = None):
        """num_splits: context splits of every decode launch; None chooses them from shapes (`decode_splits`)."""
        device = torch.device(device)
        self.scale = scale
        self.num_splits = num_splits
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1

    def plan(self, meta: AttentionMetadata) -> None:
        pass

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, max_blocks: int) -> None:
        """Compile the decode kernel for every context-split count a step can pick (`decode_split_counts`): the
        count is a compile-time constant, and an eager step's depends on its batch and table width.
        k_cache, v_cache: one layer's [KV, N, bs, Dh]; max_blocks: the widest block table a step can have."""
        kv_heads, _, block_size, head_dim = k_cache.shape
        device = k_cache.device
        q = torch.zeros(1, num_heads, head_dim, dtype=k_cache.dtype, device=device)
        out = torch.empty_like(q)
        tables = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
        lens = torch.ones(1, dtype=torch.int32, device=device)
        for splits in (decode_split_counts(kv_heads, max_blocks, block_size, self.num_sms)
                       if self.num_splits is None else (self.num_splits,)):
            paged_decode(q, k_cache, v_cache, tables, lens, self.scale, out, splits)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        nd = meta.num_decodes
        tables = meta.block_tables
        if nd:
            splits = self.num_splits or decode_splits(nd, k_cache.shape[0], tables.shape[1], k_cache.shape[2],
                                                      self.num_sms)
            paged_decode(q[:nd], k_cache, v_cache, tables[:nd], meta.seq_lens[:nd], self.scale, out[:nd], splits)
        if nd < tables.shape[0]:
            paged_prefill(q, k_cache, v_cache, tables, meta.seq_lens, meta.query_start_loc, self.scale, out,
                          first_seq=nd, num_seqs=tables.shape[0] - nd)
        return out

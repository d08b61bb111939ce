"""The Triton backend: paged decode (split-K) and causal prefill kernels reading the cache in place.

Graph-safe: `forward` reads the metadata's device tensors, its shapes and `num_decodes` (fixed for a decode-only
bucket), nothing else from the host; the number of context splits depends on shapes only.
"""

from __future__ import annotations

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.kernels.paged_attention import decode_splits, paged_decode, paged_prefill


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

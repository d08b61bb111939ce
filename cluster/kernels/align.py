"""Align (token, expert) pairs for the grouped GEMM: group them by local expert, pad each run to BLOCK_M.

Legend: T = tokens, K = experts per token, P = T*K pairs (pair id p = token * K + k), E = local experts,
C = capacity (worst-case padded pair count, a multiple of BLOCK_M), B = C // BLOCK_M blocks.

Pure torch, no host sync (no .item(), no data-dependent shapes), so it runs on CPU and CUDA and the kernels
can be enqueued right behind it; sizes are worst-case and the kernels skip blocks past the real padded total.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedPairs(NamedTuple):
    sorted_ids: torch.Tensor  # [C] int32 pair ids, grouped by local expert; padding = P (sentinel)
    block_expert: torch.Tensor  # [B] int32 local expert of each BLOCK_M block, -1 for blocks past `total`
    total: torch.Tensor  # [1] int32 padded count actually used (sum over experts of ceil(n_e / BLOCK_M) * BLOCK_M)


def capacity(num_pairs: int, num_local: int, block_m: int) -> int:
    """Worst-case padded pair count: each non-empty expert's run may need up to BLOCK_M - 1 padding entries."""
    n = num_pairs + min(num_local, num_pairs) * (block_m - 1)
    return -(-n // block_m) * block_m


def align_pairs(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int, block_m: int) -> AlignedPairs:
    """Group the pairs of `topk_ids` [T, K] (global ids) by local expert via `expert_map` [num_experts]
    (global -> local or -1); pairs whose expert is held elsewhere are dropped. See `AlignedPairs`."""
    dev = topk_ids.device
    p = topk_ids.numel()
    cap = capacity(p, num_local, block_m)
    block_start = torch.arange(0, cap, block_m, device=dev)  # [B]
    if num_local == 0 or p == 0:
        return AlignedPairs(torch.full((cap,), p, dtype=torch.int32, device=dev),
                            torch.full(block_start.shape, -1, dtype=torch.int32, device=dev),
                            torch.zeros(1, dtype=torch.int32, device=dev))

    local = expert_map.to(dev)[topk_ids.reshape(-1).long()].long()  # [P] local expert or -1
    key = torch.where(local >= 0, local, num_local)  # [P] held elsewhere -> E, sorts last
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_local]  # [E] real pairs per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_end = padded.cumsum(0)  # [E]
    pad_start = pad_end - padded  # [E] first slot of each expert's padded run
    start = counts.cumsum(0) - counts  # [E] first index of each expert in the sorted (unpadded) order

    order = torch.argsort(key, stable=True)  # [P] pair ids, grouped by expert, dropped pairs last
    skey = key[order]  # [P]
    e = skey.clamp(max=num_local - 1)
    rank = torch.arange(p, device=dev) - start[e]  # [P] position within the expert's run
    dest = torch.where(skey < num_local, pad_start[e] + rank, cap)  # [P] slot; dropped pairs -> dump slot C

    sorted_ids = torch.full((cap + 1,), p, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    # The block starting at slot s belongs to the expert whose padded run [pad_start, pad_end) holds s.
    block_expert = torch.searchsorted(pad_end, block_start, right=True)  # [B], E when past the total
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return AlignedPairs(sorted_ids[:cap], block_expert, pad_end[-1:].to(torch.int32))

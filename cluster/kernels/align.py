"""Align (token, expert) pairs for the grouped GEMM: group them by local expert, pad each run to BLOCK_M.

Legend: T = tokens, K = experts per token, P = T*K pairs (pair id p = token * K + k), E = local experts,
EP = E rounded up to a power of two, C = capacity (worst-case padded pair count, a multiple of BLOCK_M),
B = C // BLOCK_M blocks.

Two implementations of one contract (`AlignedPairs`), both without a host sync (no .item(), no data-dependent
shapes: every size comes from P, E and BLOCK_M), so a CUDA graph can hold them and the kernels can be enqueued right
behind them; sizes are worst-case and the kernels skip blocks past the real padded total:
- `align_pairs_triton`: one Triton program. The torch version is ~37 small ops, so on a GPU it costs ~37 launches
  per layer, which is more than the decode step's expert matmuls at small batches.
- `align_pairs_torch`: the reference (and the path for CPU tensors outside the Triton interpreter).
Within an expert's run pairs keep their pair order (stable), so both give identical outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cluster.kernels.tuning import interpreting


class AlignedPairs(NamedTuple):
    sorted_ids: torch.Tensor  # [C] int32 pair ids, grouped by local expert; padding = P (sentinel)
    block_expert: torch.Tensor  # [B] int32 local expert of each BLOCK_M block, -1 for blocks past `total`
    total: torch.Tensor  # [1] int32 padded count actually used (sum over experts of ceil(n_e / BLOCK_M) * BLOCK_M)


def capacity(num_pairs: int, num_local: int, block_m: int) -> int:
    """Worst-case padded pair count: each non-empty expert's run may need up to BLOCK_M - 1 padding entries, and the
    padded total is a multiple of BLOCK_M, so the bound rounds down."""
    n = num_pairs + min(num_local, num_pairs) * (block_m - 1)
    return n // block_m * block_m


def align_pairs(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int, block_m: int) -> AlignedPairs:
    """Group the pairs of `topk_ids` [T, K] (global ids) by local expert via `expert_map` [num_experts] int32
    (global -> local or -1); pairs whose expert is held elsewhere are dropped. See `AlignedPairs`.
    The Triton kernel where Triton can run it (CUDA tensors, or the interpreter), else torch."""
    if topk_ids.is_cuda or interpreting():
        return align_pairs_triton(topk_ids, expert_map, num_local, block_m)
    return align_pairs_torch(topk_ids, expert_map, num_local, block_m)


def _empty(p: int, cap: int, block_m: int, dev: torch.device) -> AlignedPairs:
    return AlignedPairs(torch.full((cap,), p, dtype=torch.int32, device=dev),
                        torch.full((cap // block_m,), -1, dtype=torch.int32, device=dev),
                        torch.zeros(1, dtype=torch.int32, device=dev))


# ---------------------------------------------------------------------------------------------------------------
# Triton: one program, three sweeps (count, lay out the slots, scatter), each over tiles of TILE pairs or slots.

@triton.jit
def _local_onehot(ids_ptr, expert_map_ptr, pair, num_pairs, experts):
    """[TILE, EP] int32: row i is the one-hot local expert of pair `pair[i]`; all zero if held elsewhere or >= P."""
    ok = pair < num_pairs
    gid = tl.load(ids_ptr + pair, mask=ok, other=0)  # [TILE] global expert
    local = tl.load(expert_map_ptr + gid, mask=ok, other=-1)  # [TILE] local expert or -1
    return (local[:, None] == experts[None, :]).to(tl.int32)


# Sizes that change every step are not specialised on (no recompiles while serving: see TritonMoEBackend.warm_up).
@triton.jit(do_not_specialize=["num_pairs", "num_slots"])
def _align_kernel(
    ids_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr, num_pairs, num_slots,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TILE: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)  # [EP]
    lane = tl.arange(0, TILE)  # [TILE]

    # 1. Pairs per local expert (experts >= E count nothing: the map never yields them).
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_pairs, TILE):
        counts += tl.sum(_local_onehot(ids_ptr, expert_map_ptr, p0 + lane, num_pairs, experts), axis=0)

    # 2. Expert e owns slots [start[e], end[e]); its pairs fill [start[e], start[e] + counts[e]), the rest is padding.
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [EP]
    start = tl.sum(tl.where(experts[None, :] < experts[:, None], padded[None, :], 0), axis=1)  # [EP] exclusive prefix
    end = start + padded
    filled = start + counts
    tl.store(total_ptr, tl.sum(padded, axis=0))

    # 3. Every slot: the sentinel where it is padding, and its block's expert at each block's first slot. Slots that
    #    will hold a pair are left to step 4, so no address is written twice (no ordering between threads needed).
    for s0 in range(0, num_slots, TILE):
        slot = s0 + lane  # [TILE]
        in_run = (slot[:, None] >= start[None, :]) & (slot[:, None] < end[None, :])  # [TILE, EP]
        owner = tl.max(tl.where(in_run, experts[None, :], -1), axis=1)  # [TILE] -1 past the total
        holds_pair = tl.sum((in_run & (slot[:, None] < filled[None, :])).to(tl.int32), axis=1)  # [TILE] 0 or 1
        ok = slot < num_slots
        tl.store(sorted_ids_ptr + slot, tl.zeros([TILE], dtype=tl.int32) + num_pairs, mask=ok & (holds_pair == 0))
        tl.store(block_expert_ptr + slot // BLOCK_M, owner, mask=ok & (slot % BLOCK_M == 0))

    # 4. Scatter: the r-th pair of expert e (in pair order) goes to slot start[e] + r.
    nxt = start  # [EP] next free slot of each expert
    for p0 in range(0, num_pairs, TILE):
        pair = p0 + lane  # [TILE]
        onehot = _local_onehot(ids_ptr, expert_map_ptr, pair, num_pairs, experts)  # [TILE, EP]
        rank = tl.cumsum(onehot, axis=0) - onehot  # [TILE, EP] earlier pairs of the same expert in this tile
        dest = tl.sum(onehot * (nxt[None, :] + rank), axis=1)  # [TILE] (0 for pairs not held here: masked)
        tl.store(sorted_ids_ptr + dest, pair, mask=tl.sum(onehot, axis=1) > 0)
        nxt += tl.sum(onehot, axis=0)


def align_tile(e_pad: int) -> int:
    """Pairs (or slots) per sweep step: the [TILE, EP] one-hot stays at 4096 entries (registers of one program)."""
    return max(16, min(512, 4096 // e_pad))


def align_pairs_triton(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int,
                       block_m: int) -> AlignedPairs:
    """`align_pairs` as one single-program Triton launch (a fixed grid of 1: the work is a few thousand pairs at
    most per sweep step, and one program needs no cross-program prefix sum)."""
    dev = topk_ids.device
    p = topk_ids.numel()
    cap = capacity(p, num_local, block_m)
    if num_local == 0 or p == 0:  # shapes only: no launch needed
        return _empty(p, cap, block_m, dev)
    out = AlignedPairs(torch.empty(cap, dtype=torch.int32, device=dev),
                       torch.empty(cap // block_m, dtype=torch.int32, device=dev),
                       torch.empty(1, dtype=torch.int32, device=dev))
    e_pad = max(2, triton.next_power_of_2(num_local))  # >= 2: no size-1 axes to reduce over
    _align_kernel[(1,)](
        topk_ids.reshape(-1), expert_map, out.sorted_ids, out.block_expert, out.total, p, cap,
        BLOCK_M=block_m, E_PAD=e_pad, TILE=align_tile(e_pad), num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# torch: the reference.

def align_pairs_torch(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int,
                      block_m: int) -> AlignedPairs:
    """`align_pairs` in plain torch ops (any device)."""
    dev = topk_ids.device
    p = topk_ids.numel()
    cap = capacity(p, num_local, block_m)
    if num_local == 0 or p == 0:
        return _empty(p, cap, block_m, dev)

    block_start = torch.arange(0, cap, block_m, device=dev)  # [B]
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

"""Pair alignment: the Triton kernel against the torch reference and against the contract's invariants.

Legend: T = tokens, K = experts per token, P = T*K pairs, E = local experts, C = padded capacity, B = C // BLOCK_M.
Routing is seeded (seed in every failure message); tensors live on the `device` fixture (the interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from cluster.kernels.align import (  # noqa: E402
    AlignedPairs, align_pairs, align_pairs_torch, align_pairs_triton, align_tile, capacity,
)
from cluster.moe.weights import _expert_map  # noqa: E402

NUM_EXPERTS = 8


def routing(t: int, k: int, seed: int, allowed: list[int] | None = None, skew: float = 0.0) -> torch.Tensor:
    """[T, K] int64 distinct global experts per token, only from `allowed`, skewed towards the first of them."""
    g = torch.Generator().manual_seed(seed)
    allowed = list(range(NUM_EXPERTS)) if allowed is None else allowed
    logits = torch.full((t, NUM_EXPERTS), float("-inf"))
    logits[:, allowed] = torch.randn(t, len(allowed), generator=g) - skew * torch.arange(len(allowed)).float()
    return torch.multinomial(torch.softmax(logits, dim=-1), k, generator=g)


def check_invariants(a: AlignedPairs, ids: torch.Tensor, emap: torch.Tensor, num_local: int, bm: int,
                     why: str) -> None:
    """The `AlignedPairs` contract, from the routing alone (CPU copies)."""
    ids, emap = ids.cpu(), emap.cpu()
    sorted_ids, block_expert, total = (x.cpu() for x in a)
    p = ids.numel()
    cap = capacity(p, num_local, bm)
    assert sorted_ids.shape == (cap,) and block_expert.shape == (cap // bm,) and total.shape == (1,), why
    assert sorted_ids.dtype == block_expert.dtype == total.dtype == torch.int32, why
    local = emap[ids.flatten()].long()  # [P] local expert or -1
    counts = torch.bincount(local[local >= 0], minlength=num_local)  # [E]
    want_total = int(((counts + bm - 1) // bm * bm).sum())
    assert int(total) == want_total, f"{why}: total {int(total)} != {want_total}"
    real = sorted_ids[sorted_ids < p]
    assert ((sorted_ids >= 0) & (sorted_ids <= p)).all(), why  # pair ids or the sentinel, nothing else
    # every held pair exactly once, nothing else
    assert sorted(real.tolist()) == torch.nonzero(local >= 0).flatten().tolist(), why
    assert (sorted_ids[want_total:] == p).all(), why  # past the total: sentinel only
    assert (block_expert[want_total // bm:] == -1).all(), why  # -1 blocks past the total
    # runs grouped by expert, in expert order, each padded to BM with the sentinel after its pairs
    slot = 0
    for e in range(num_local):
        n = int(counts[e])
        run = -(-n // bm) * bm
        assert (local[sorted_ids[slot:slot + n].long()] == e).all(), f"{why}: expert {e} run"
        assert (sorted_ids[slot + n:slot + run] == p).all(), f"{why}: expert {e} padding"
        assert (block_expert[slot // bm:(slot + run) // bm] == e).all(), f"{why}: expert {e} blocks"
        slot += run
    assert slot == want_total, why


CASES = [
    # (T, K, BLOCK_M, held experts of 8, routing restricted to, skew)
    (1, 2, 16, list(range(8)), None, 0.0),
    (2, 2, 32, [1, 4, 6], None, 0.0),
    (7, 1, 16, [3], None, 0.0),
    (37, 2, 16, [1, 4, 6], None, 0.5),
    (64, 3, 32, list(range(8)), None, 0.0),
    (100, 2, 16, list(range(8)), None, 4.0),  # skewed: most pairs on experts 0 and 1
    (5, 2, 64, [0, 2, 3, 5, 7], None, 0.0),  # E = 5: padded to EP = 8
    (300, 2, 16, list(range(8)), None, 1.0),  # P = 600 pairs: more than one tile
    (300, 2, 64, [2, 5], None, 0.0),  # experts held elsewhere, several tiles
    (257, 2, 32, [6], [6, 7], 0.0),  # one local expert, every token on it: P/2 pairs, the rest dropped
    (40, 2, 16, list(range(8)), [0, 3], 0.0),  # idle experts between busy ones
    (19, 2, 32, [1, 4], [0, 2, 3, 5, 7], 0.0),  # nothing local
]


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_align_matches_torch_and_the_contract(case: int, seed: int, ids_dtype: torch.dtype,
                                                     device: torch.device) -> None:
    t, k, bm, held, allowed, skew = CASES[case]
    why = f"case {CASES[case]} seed {seed} {ids_dtype}"
    ids = routing(t, k, seed, allowed, skew).to(device=device, dtype=ids_dtype)
    emap = _expert_map(tuple(held), NUM_EXPERTS, device)
    got = align_pairs_triton(ids, emap, len(held), bm)
    want = align_pairs_torch(ids, emap, len(held), bm)
    check_invariants(want, ids, emap, len(held), bm, f"torch {why}")
    check_invariants(got, ids, emap, len(held), bm, f"triton {why}")
    for name, g, w in zip(AlignedPairs._fields, got, want):  # both keep pair order within a run: identical
        assert torch.equal(g.cpu(), w.cpu()), f"{why}: {name} differs from torch"


def test_all_local_all_on_one_expert(device: torch.device) -> None:
    """Every pair on one expert of eight: one run, the other experts' blocks absent."""
    ids = torch.full((50, 1), 3, dtype=torch.int64, device=device)
    emap = _expert_map(tuple(range(8)), 8, device)
    a = align_pairs_triton(ids, emap, 8, 16)
    check_invariants(a, ids, emap, 8, 16, "one expert")
    assert int(a.total) == 64 and a.sorted_ids[:50].cpu().tolist() == list(range(50))


@pytest.mark.parametrize("impl", [align_pairs_triton, align_pairs_torch], ids=["triton", "torch"])
def test_nothing_local_and_no_pairs(impl, device: torch.device) -> None:
    emap = _expert_map((1, 4), 8, device)
    a = impl(torch.tensor([[0, 2], [3, 7]], device=device), emap, 2, 32)
    assert int(a.total) == 0 and (a.block_expert == -1).all() and (a.sorted_ids == 4).all()
    assert a.sorted_ids.numel() == capacity(4, 2, 32)
    empty = impl(torch.zeros(0, 2, dtype=torch.int64, device=device), emap, 2, 32)
    assert empty.sorted_ids.numel() == 0 and empty.block_expert.numel() == 0 and int(empty.total) == 0
    none_held = impl(torch.tensor([[0, 2]], device=device), _expert_map((), 8, device), 0, 32)
    assert int(none_held.total) == 0 and (none_held.sorted_ids == 2).all()


def test_sizes_come_from_shapes_only(device: torch.device) -> None:
    """Output sizes depend on (P, E, BLOCK_M) alone, never on the routing: what a CUDA graph needs."""
    emap = _expert_map(tuple(range(8)), 8, device)
    shapes = {tuple(x.shape for x in align_pairs(routing(33, 2, s, skew=sk).to(device), emap, 8, 16))
              for s, sk in [(0, 0.0), (1, 5.0), (2, 0.0)]}
    assert len(shapes) == 1
    assert align_tile(8) == 512 and align_tile(64) == 64 and align_tile(1) == 512


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_triton_align_in_a_cuda_graph(device: torch.device) -> None:
    """No host sync: the kernel captures into a CUDA graph, and replays follow new routings."""
    emap = _expert_map(tuple(range(8)), 8, device)
    ids = routing(24, 2, 0).to(device)
    align_pairs_triton(ids, emap, 8, 16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = align_pairs_triton(ids, emap, 8, 16)
    for seed in (1, 2):
        ids.copy_(routing(24, 2, seed, skew=2.0 * seed).to(device))
        graph.replay()
        torch.cuda.synchronize()
        want = align_pairs_torch(ids, emap, 8, 16)
        assert all(torch.equal(g, w) for g, w in zip(out, want)), seed


@pytest.mark.parametrize("bm", [16, 32])
def test_capacity_is_the_worst_case(bm: int) -> None:
    """capacity(P, E, BM) holds the largest padded total any routing of P pairs over E experts can give, with less
    than one block to spare. Worst case by dynamic programming over how many pairs the first experts take."""
    for e in (1, 2, 3, 8):
        worst = [0] + [-1] * 80  # worst[p]: largest padded total of p pairs over the experts so far
        for _ in range(e):
            worst = [max(worst[p - n] + -(-n // bm) * bm for n in range(p + 1) if worst[p - n] >= 0)
                     for p in range(len(worst))]
        for p in range(len(worst)):
            cap = capacity(p, e, bm)
            assert worst[p] <= cap < worst[p] + bm, f"P={p} E={e} BM={bm}: capacity {cap}, worst case {worst[p]}"

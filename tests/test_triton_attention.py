"""The Triton paged-attention kernels (decode, prefill, KV write) and backend against float64 attention computed from
the definition, on scattered block tables.

Legend: T = new tokens, B = sequences, H = query heads, KV = kv heads, Dh = head dim, N = blocks, bs = block size.
"""

import pytest
import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.attention.triton_backend import TritonAttentionBackend
from cluster.kernels.paged_attention import decode_splits, paged_decode, paged_prefill, store_kv

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _layout(contexts: list[int], bs: int, seed: int, spare: int = 3) -> tuple[int, list[list[int]], torch.Tensor]:
    """(N, per-sequence block lists, [B, NB] int32 table) with every sequence's blocks drawn from a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in contexts]
    num_blocks = sum(need) + spare
    free = torch.randperm(num_blocks, generator=g).tolist()
    lists = [[free.pop() for _ in range(k)] for k in need]
    width = max(1, max(need))
    table = torch.tensor([t + [0] * (width - len(t)) for t in lists], dtype=torch.int32)
    return num_blocks, lists, table


def _cache(kv_heads: int, num_blocks: int, bs: int, head_dim: int, dtype: torch.dtype, device: torch.device,
           seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [KV, N, bs, Dh]: keys grow in scale along each block (the running max rises step after step, so the
    rescaling is exercised); values hold a few large entries."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g) * torch.linspace(0.5, 3.0, bs).view(1, 1, bs, 1)
    v = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g)
    v.view(-1)[::97] = 20.0
    return k.to(dtype).to(device), v.to(dtype).to(device)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: list[list[int]], contexts: list[int],
               query_lens: list[int], scale: float) -> torch.Tensor:
    """float64 [T, H, Dh]: sequence b's new tokens sit at positions ctx - n .. ctx - 1 and see keys 0..pos."""
    kv_heads, _, bs, head_dim = k.shape
    heads = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    t = 0
    for table, ctx, n in zip(tables, contexts, query_lens):
        if ctx == 0:
            t += n
            continue
        rows = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
        keys = k.cpu().reshape(kv_heads, -1, head_dim)[:, rows].double().repeat_interleave(heads // kv_heads, 0)
        values = v.cpu().reshape(kv_heads, -1, head_dim)[:, rows].double().repeat_interleave(heads // kv_heads, 0)
        qs = q[t:t + n].cpu().double()  # [n, H, Dh]
        scores = torch.einsum("ihd,hjd->hij", qs, keys) * scale  # [H, n, ctx]
        pos = torch.arange(ctx - n, ctx)
        scores.masked_fill_(torch.arange(ctx)[None, :] > pos[:, None], float("-inf"))
        out[t:t + n] = torch.einsum("hij,hjd->ihd", scores.softmax(-1), values)
        t += n
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu().double() - want).norm() / want.norm()).item()


# (H, KV, Dh, bs, dtype, splits): GQA ratios 1, 4, 8 and Mixtral's 6 (48/8 in full), head dims 64 and 128.
DECODE_CASES = [
    (8, 8, 64, 16, torch.float32, 1),
    (16, 4, 64, 16, torch.bfloat16, 3),
    (16, 2, 128, 32, torch.float32, 4),
    (12, 2, 128, 16, torch.bfloat16, 2),
    (48, 8, 128, 16, torch.bfloat16, 1),
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, bs, dtype, splits", DECODE_CASES)
def test_decode_matches_float64(device, heads, kv_heads, head_dim, bs, dtype, splits):
    seed = heads * 1000 + head_dim + bs + splits
    # Block edges (k*bs - 1, k*bs, k*bs + 1), one token, a padding row (context 0) and one long context: 2600 tokens
    # with 2 kv heads, shorter with more (the interpreter's time grows with blocks x kv heads).
    contexts = [1, bs - 1, bs, bs + 1, 3 * bs - 1, 0, 3 * bs + 1, 2 * bs, 5200 // kv_heads]
    num_blocks, lists, table = _layout(contexts, bs, seed)
    k, v = _cache(kv_heads, num_blocks, bs, head_dim, dtype, device, seed)
    q = (torch.randn(len(contexts), heads, head_dim, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    scale = head_dim ** -0.5
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device=device)
    paged_decode(q.to(device), k, v, table.to(device), seq_lens, scale, out, num_splits=splits)
    want = _reference(q, k, v, lists, contexts, [1] * len(contexts), scale)
    assert torch.all(out[5] == 0), f"seed {seed}: the padding row must be zeros"
    err = _rel(out, want)
    assert err < TOLERANCE[dtype], f"seed {seed}: relative error {err:.2e}"


# (H, KV, Dh, bs, dtype)
PREFILL_CASES = [
    (4, 4, 64, 16, torch.float32),
    (8, 2, 64, 32, torch.bfloat16),
    (16, 2, 128, 16, torch.float32),
    (12, 2, 128, 16, torch.bfloat16),
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, bs, dtype", PREFILL_CASES)
def test_prefill_matches_float64(device, heads, kv_heads, head_dim, bs, dtype):
    seed = heads * 100 + head_dim + bs
    # (cached prefix, new tokens): fresh prompts, chunked continuations ending at and around block edges, a chunk of
    # one token, and a chunk after a long cached prefix.
    chunks = [(0, 45), (2 * bs, 20), (bs - 1, 2), (5, 1), (0, bs), (bs + 1, bs - 1), (1200, 24)]
    contexts = [p + n for p, n in chunks]
    query_lens = [n for _, n in chunks]
    num_blocks, lists, table = _layout(contexts, bs, seed)
    k, v = _cache(kv_heads, num_blocks, bs, head_dim, dtype, device, seed)
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    scale = head_dim ** -0.5
    paged_prefill(q.to(device), k, v, table.to(device), torch.tensor(contexts, dtype=torch.int32, device=device), qsl,
                  scale, out)
    want = _reference(q, k, v, lists, contexts, query_lens, scale)
    err = _rel(out, want)
    assert err < TOLERANCE[dtype], f"seed {seed}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_mixed_step_writes_kv_and_skips_padding(device, dtype):
    """Decodes (one a padding row: slot -1, context 0) then prefill chunks in one flat batch, through the backend
    with the Triton KV write: the new rows land in their slots, nothing else in the cache changes, the padding row's
    output is zeros and every other row matches float64 attention over the updated cache."""
    heads, kv_heads, head_dim, bs = 8, 2, 64, 16
    seed = 7
    decodes = [40, 0, 17, 16]  # contexts after this step; the 0 is padding
    chunks = [(0, 30), (33, 12)]  # (cached prefix, new tokens)
    contexts = decodes + [p + n for p, n in chunks]
    query_lens = [1] * len(decodes) + [n for _, n in chunks]
    num_blocks, lists, table = _layout(contexts, bs, seed)
    k_cache, v_cache = _cache(kv_heads, num_blocks, bs, head_dim, dtype, device, seed)
    slots = []
    for table_list, ctx, n in zip(lists, contexts, query_lens):
        slots += [table_list[p // bs] * bs + p % bs for p in range(ctx - n, ctx)] if ctx else [-1]
    g = torch.Generator().manual_seed(seed)
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    k_new = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(total, kv_heads, head_dim, generator=g).to(dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()

    slot_mapping = torch.tensor(slots, dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping, table.to(device), query_lens, contexts, len(decodes))
    store_kv(k_new.to(device), v_new.to(device), k_cache, v_cache, slot_mapping)
    out = TritonAttentionBackend(head_dim ** -0.5, device, num_splits=2).forward(q.to(device), k_cache, v_cache, meta)

    written = torch.tensor([s for s in slots if s >= 0])
    real = torch.tensor([i for i, s in enumerate(slots) if s >= 0])
    for cache, before, new in ((k_cache, before_k, k_new), (v_cache, before_v, v_new)):
        flat, old = cache.cpu().reshape(kv_heads, -1, head_dim), before.cpu().reshape(kv_heads, -1, head_dim)
        assert torch.equal(flat[:, written], new[real].transpose(0, 1)), f"seed {seed}: new rows not written"
        untouched = torch.ones(flat.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(flat[:, untouched], old[:, untouched]), f"seed {seed}: rows outside the slots changed"
    assert torch.all(out[1] == 0), f"seed {seed}: the padding row must be zeros"
    want = _reference(q, k_cache, v_cache, lists, contexts, query_lens, head_dim ** -0.5)
    err = _rel(out, want)
    assert err < TOLERANCE[dtype], f"seed {seed}: relative error {err:.2e}"


def test_decode_splits_depend_on_shapes_only():
    assert decode_splits(64, 8, 256, 16, 132) == 2  # batch 64 x 4K on an H200: 512 programs -> 1024
    assert decode_splits(1, 8, 256, 16, 132) == 16  # one long sequence: as many as the context allows
    assert decode_splits(1, 8, 4, 16, 132) == 1  # a short context is never split below 256 keys
    assert decode_splits(0, 8, 256, 16, 132) == 1

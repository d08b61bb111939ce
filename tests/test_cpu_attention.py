"""The C paged decode-attention kernel against attention computed in float64 from the same cache rows."""

import dataclasses

import pytest
import torch

from cluster.checkpoint.presets import preset
from cluster.engine.paged_cache import AttentionMetadata, PagedKVCache

pytestmark = pytest.mark.cpu_kernels  # the rule in conftest.py: skips only without AVX2/FMA or a compiler outside CI


def _reference(q: torch.Tensor, cache: PagedKVCache, tables: list[list[int]], contexts: list[int]) -> torch.Tensor:
    """q [B, H, Dh] over layer 0's rows, each sequence read through its own table, in float64."""
    kv_heads, _, bs, head_dim = cache.k[0].shape
    group = q.shape[1] // kv_heads
    out = []
    for b, (table, n) in enumerate(zip(tables, contexts)):
        rows = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)], dtype=torch.long)
        k = cache.k[0].reshape(kv_heads, -1, head_dim)[:, rows].double().repeat_interleave(group, 0)  # [H, n, Dh]
        v = cache.v[0].reshape(kv_heads, -1, head_dim)[:, rows].double().repeat_interleave(group, 0)
        probs = (torch.einsum("hd,hnd->hn", q[b].double(), k) * cache.scale).softmax(-1)
        out.append(torch.einsum("hn,hnd->hd", probs, v))
    return torch.stack(out).float()


# Mixtral's shape (G = 4, Dh = 128), the mini preset's, one kv head for eight query heads, G = 6 with 32-row blocks,
# and a 16-wide head (the kernel's narrowest accumulator path).
@pytest.mark.parametrize("heads, kv_heads, head_dim, block", [
    (32, 8, 128, 16), (8, 2, 64, 16), (8, 1, 64, 8), (12, 2, 128, 32), (4, 2, 16, 8)])
def test_decode_kernel_matches_float64_attention(heads, kv_heads, head_dim, block):
    config = dataclasses.replace(preset("tiny"), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                 num_layers=1)
    g = torch.Generator().manual_seed(heads + head_dim + block)
    # A context of 1, ones ending just inside, at and past a block edge, and long ones over many blocks.
    # A padding row (context 0, slot -1) must give zeros and write nothing the others read.
    contexts = [1, block - 1, block, block + 1, 0, 3 * block + 5, 300, 1000]
    num_blocks = sum(-(-n // block) for n in contexts) + 3
    cache = PagedKVCache(config, num_blocks, block, torch.float32)
    assert cache.backend.name == "cpu"
    free = torch.randperm(num_blocks, generator=g).tolist()  # scattered, in no order
    tables = [[free.pop() for _ in range(-(-n // block))] for n in contexts]
    # Keys of growing scale along each sequence: the running max rises block after block, so the kernel's
    # rescaling of what it has summed so far is exercised; values hold a few large rows.
    cache.k.normal_(generator=g).mul_(torch.linspace(0.5, 3.0, block).view(1, 1, 1, block, 1))
    cache.v.normal_(generator=g)
    cache.v.view(-1)[::97] = 50.0
    q = torch.randn(len(contexts), heads, head_dim, generator=g) * 2
    k_new = torch.randn(len(contexts), kv_heads, head_dim, generator=g)
    v_new = torch.randn(len(contexts), kv_heads, head_dim, generator=g)
    width = max(len(t) for t in tables)
    slots = [t[(n - 1) // block] * block + (n - 1) % block if n else -1 for t, n in zip(tables, contexts)]
    cache.begin_step(AttentionMetadata(torch.tensor(slots), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                                       [1] * len(contexts), contexts, len(contexts)))
    got = cache.attend(0, q, k_new, v_new)  # writes each sequence's newest row, then attends over all of them
    want = _reference(q, cache, tables, contexts)
    assert torch.all(got[4] == 0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_decodes_next_to_prefill_chunks_use_the_kernel_only_for_the_decodes():
    config = dataclasses.replace(preset("tiny"), num_layers=1)
    block = 8
    cache = PagedKVCache(config, 16, block, torch.float32)
    torch_cache = PagedKVCache(config, 16, block, torch.float32, use_kernel=False)
    assert (cache.backend.name, torch_cache.backend.name) == ("cpu", "torch")
    g = torch.Generator().manual_seed(3)
    for c in (cache, torch_cache):
        c.k.copy_(torch.randn(c.k.shape, generator=torch.Generator().manual_seed(4)))
        c.v.copy_(torch.randn(c.v.shape, generator=torch.Generator().manual_seed(5)))
    # two decodes (contexts 20 and 9), then a 5-token chunk that starts at position 6
    meta = AttentionMetadata(torch.tensor([2 * 8 + 3, 4 * 8, 6 * 8 + 6, 6 * 8 + 7, 7 * 8, 7 * 8 + 1, 7 * 8 + 2]),
                             torch.tensor([[0, 1, 2], [3, 4, 0], [6, 7, 0]]), [1, 1, 5], [20, 9, 11], 2)
    q = torch.randn(7, config.num_heads, config.head_dim, generator=g)
    k = torch.randn(7, config.num_kv_heads, config.head_dim, generator=g)
    v = torch.randn(7, config.num_kv_heads, config.head_dim, generator=g)
    outs = []
    for c in (cache, torch_cache):
        c.begin_step(meta)
        outs.append(c.attend(0, q, k, v))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)

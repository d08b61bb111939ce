"""The paged cache must attend exactly like the contiguous one: scattered blocks, mixed steps, grouped decodes, and
decodes through the C kernel."""

import shutil

import pytest
import torch

from cluster.engine.paged_cache import AttentionMetadata, PagedKVCache
from cluster.kernels.cpu_build import cpu_supports_kernels
from cluster.model.kv_cache import ContiguousKVCache
from cluster.model.loader import load_model

NUM_BLOCKS = 256


class PagedRun:
    """Sequences laid out in blocks taken from a shuffled free list, as the block manager may hand them out."""

    def __init__(self, config, block: int, decode_groups: int, min_group: int, kernel: bool):
        self.block = block
        self.cache = PagedKVCache(config, NUM_BLOCKS, block, torch.float32, use_kernel=kernel)
        assert (self.cache.kernel is not None) == kernel
        self.cache.decode_groups, self.cache.min_group = decode_groups, min_group
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(1)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, model, tokens: dict[int, torch.Tensor], plan: list[tuple[int, int]]) -> torch.Tensor:
        """plan: (sequence, new tokens) in flat-batch order, decodes first -> logits of every new token."""
        ids, positions, slots = [], [], []
        block = self.block
        for seq, n in plan:
            start = self.lens.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * block < start + n:
                table.append(self.free.pop())
            ids.append(tokens[seq][start:start + n])
            positions += range(start, start + n)
            slots += [table[p // block] * block + p % block for p in range(start, start + n)]
            self.lens[seq] = start + n
        width = max(len(self.tables[s]) for s, _ in plan)
        tables = torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in plan])
        self.cache.begin_step(AttentionMetadata(torch.tensor(slots), tables, [n for _, n in plan],
                                                [self.lens[s] for s, _ in plan], sum(n == 1 for _, n in plan)))
        return model.compute_logits(model(torch.cat(ids), torch.tensor(positions), self.cache))


def _schedule(prompts: dict[int, int]) -> list[list[tuple[int, int]]]:
    """Prefill chunks next to decodes of other sequences of very different lengths, then decodes alone."""
    first = {s: p // 2 for s, p in prompts.items()}
    steps = [[(s, first[s]) for s in prompts]]
    steps.append([(s, prompts[s] - first[s]) for s in prompts])  # chunks that start mid-sequence
    late = max(prompts) + 1  # a sequence arriving while the others decode
    steps.append([(s, 1) for s in prompts] + [(late, 30)])
    steps.append([(s, 1) for s in prompts] + [(late, 9)])
    steps += [[(s, 1) for s in (*prompts, late)] for _ in range(4)]
    return steps


KERNEL = pytest.mark.skipif(not cpu_supports_kernels() or shutil.which("gcc") is None,
                            reason="the C kernels need AVX2, FMA and gcc")


@pytest.mark.parametrize("block, decode_groups, min_group, kernel", [
    (4, 1, 16, False), (4, 4, 2, False),
    pytest.param(8, 1, 16, True, marks=KERNEL), pytest.param(16, 1, 16, True, marks=KERNEL)])
def test_paged_attention_equals_contiguous(tiny_dir, block, decode_groups, min_group, kernel):
    lm = load_model(tiny_dir, "fp32")
    model, c = lm.model, lm.config
    prompts = {0: 3, 1: 61, 2: 17, 3: 40, 4: 6, 5: 33, 6: 2, 7: 50}
    g = torch.Generator().manual_seed(0)
    tokens = {s: torch.randint(0, c.vocab_size, (120,), generator=g) for s in range(len(prompts) + 1)}
    paged = PagedRun(c, block, decode_groups, min_group, kernel)
    contiguous = ContiguousKVCache(c.num_layers, len(tokens), 128, c.num_kv_heads, c.head_dim)
    for plan in _schedule(prompts):
        plan.sort(key=lambda step: step[1] != 1)  # single tokens first, as the model runner orders them
        got = paged.step(model, tokens, plan)
        flat = torch.cat([tokens[s][paged.lens[s] - n:paged.lens[s]] for s, n in plan])
        want = model.compute_logits(model(flat, contiguous.begin_step([s for s, _ in plan], [n for _, n in plan]),
                                          contiguous))
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    if decode_groups > 1:
        assert len(paged.cache.groups) == 4  # the last steps decode 9 sequences in groups of 2 or 3

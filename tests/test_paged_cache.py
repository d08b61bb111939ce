"""The paged cache must attend exactly like the contiguous one: scattered blocks, mixed steps, grouped decodes,
decodes through the C kernel, and the Triton backend (the interpreter on CPU); a decode batch padded to a bucket
must give its real rows the logits they get unpadded."""

import pytest
import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.engine.model_runner import ModelRunner
from cluster.engine.paged_cache import PagedKVCache
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.engine.sequence import Sequence
from cluster.model.kv_cache import ContiguousKVCache
from cluster.model.loader import load_model

NUM_BLOCKS = 256


class PagedRun:
    """Sequences laid out in blocks taken from a shuffled free list, as the block manager may hand them out."""

    def __init__(self, config, block: int, decode_groups: int, min_group: int, backend: str,
                 device: torch.device = torch.device("cpu")):
        self.block = block
        self.device = device
        self.cache = PagedKVCache(config, NUM_BLOCKS, block, torch.float32, device, backend=backend)
        assert self.cache.backend.name == backend
        if backend == "torch":
            self.cache.backend.decode_groups, self.cache.backend.min_group = decode_groups, min_group
        if backend == "triton":
            self.cache.backend.num_splits = 2  # the split-K path with its reduce, on short contexts too
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
        self.cache.begin_step(AttentionMetadata(torch.tensor(slots).to(self.device), tables.to(self.device),
                                                [n for _, n in plan], [self.lens[s] for s, _ in plan],
                                                sum(n == 1 for _, n in plan)))
        hidden = model(torch.cat(ids).to(self.device), torch.tensor(positions).to(self.device), self.cache)
        return model.compute_logits(hidden).cpu()


def _schedule(prompts: dict[int, int], decode_steps: int = 4) -> list[list[tuple[int, int]]]:
    """Prefill chunks next to decodes of other sequences of very different lengths, then `decode_steps` decodes
    alone."""
    first = {s: p // 2 for s, p in prompts.items()}
    steps = [[(s, first[s]) for s in prompts]]
    steps.append([(s, prompts[s] - first[s]) for s in prompts])  # chunks that start mid-sequence
    late = max(prompts) + 1  # a sequence arriving while the others decode
    steps.append([(s, 1) for s in prompts] + [(late, 30)])
    steps.append([(s, 1) for s in prompts] + [(late, 9)])
    steps += [[(s, 1) for s in (*prompts, late)] for _ in range(decode_steps)]
    return steps


KERNEL = pytest.mark.cpu_kernels  # the rule in conftest.py: skips only without AVX2/FMA or a compiler outside CI


# last_groups: the torch backend's decode groups in the last step (9 decoding sequences); None where it has none.
@pytest.mark.parametrize("block, decode_groups, min_group, backend, last_groups", [
    (4, 1, 16, "torch", 1), (4, 4, 2, "torch", 4),
    pytest.param(16, 1, 16, "triton", None, marks=pytest.mark.e2e),  # the whole model on the Triton path
    pytest.param(8, 1, 16, "cpu", None, marks=KERNEL), pytest.param(16, 1, 16, "cpu", None, marks=KERNEL)])
def test_paged_attention_equals_contiguous(tiny_dir, device, block, decode_groups, min_group, backend, last_groups):
    # Triton runs where its kernel tests do (compiled on a GPU, else the interpreter); the others on the CPU.
    device = device if backend == "triton" else torch.device("cpu")
    lm = load_model(tiny_dir, "fp32", device)
    model, c = lm.model, lm.config
    prompts = {0: 3, 1: 61, 2: 17, 3: 40, 4: 6, 5: 33, 6: 2, 7: 50}
    g = torch.Generator().manual_seed(0)
    tokens = {s: torch.randint(0, c.vocab_size, (120,), generator=g) for s in range(len(prompts) + 1)}
    paged = PagedRun(c, block, decode_groups, min_group, backend, device)
    contiguous = ContiguousKVCache(c.num_layers, len(tokens), 128, c.num_kv_heads, c.head_dim, device=device)
    # Triton under the interpreter takes one decode-only step (its kernels run per program, slowly).
    for plan in _schedule(prompts, 1 if backend == "triton" and device.type == "cpu" else 4):
        plan.sort(key=lambda step: step[1] != 1)  # single tokens first, as the model runner orders them
        got = paged.step(model, tokens, plan)
        flat = torch.cat([tokens[s][paged.lens[s] - n:paged.lens[s]] for s, n in plan]).to(device)
        want = model.compute_logits(model(flat, contiguous.begin_step([s for s, _ in plan], [n for _, n in plan]),
                                          contiguous)).cpu()
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    groups = getattr(paged.cache.backend, "groups", None)
    assert (None if groups is None else len(groups)) == last_groups  # 4: the 9 sequences in groups of 2 or 3


def test_torch_backend_bounded_workspace_equals_contiguous(tiny_dir):
    """A workspace too small for one group (rows a few at a time) or even one context (column chunks merged by
    online softmax) must not change the logits; it never holds more than its cap."""
    lm = load_model(tiny_dir, "fp32")
    model, c = lm.model, lm.config
    prompts = {0: 3, 1: 61, 2: 9, 3: 40, 4: 5}
    g = torch.Generator().manual_seed(2)
    tokens = {s: torch.randint(0, c.vocab_size, (120,), generator=g) for s in range(len(prompts) + 1)}
    paged = PagedRun(c, 4, 4, 2, "torch")
    cap = 2 * 3 * paged.cache.backend.block_bytes  # 3 blocks (12 tokens) of keys and of values
    paged.cache.backend.workspace = type(paged.cache.backend.workspace)(cap, torch.float32, torch.device("cpu"))
    contiguous = ContiguousKVCache(c.num_layers, len(tokens), 128, c.num_kv_heads, c.head_dim)
    for plan in _schedule(prompts):
        plan.sort(key=lambda step: (step[1] != 1, paged.lens.get(step[0], 0)))  # as the runner: shortest first
        got = paged.step(model, tokens, plan)
        flat = torch.cat([tokens[s][paged.lens[s] - n:paged.lens[s]] for s, n in plan])
        want = model.compute_logits(model(flat, contiguous.begin_step([s for s, _ in plan], [n for _, n in plan]),
                                          contiguous))
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    groups = paged.cache.backend.groups  # the last step's: 6 decodes in 3 planned groups of 2
    assert len(groups) > 3, "a short group must have been cut into fewer rows"
    assert any(group.bias is None for group in groups), "a long group must go row by row in column chunks"
    assert all(b.numel() * 4 <= cap // 2 for b in paged.cache.backend.workspace._buffers.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_bucket_equals_unpadded(tiny_dir, device, backend):
    """A decode batch laid out in a bucket's static buffers (padding: token 0, position 0, slot -1, context 0) gives
    its real rows the logits of the unpadded step, and the padding writes nothing into the cache's blocks."""
    device = device if backend == "triton" else torch.device("cpu")
    lm = load_model(tiny_dir, "fp32", device)
    model, c = lm.model, lm.config
    block, num_blocks, bucket = 16, 32, 8
    cache = PagedKVCache(c, num_blocks, block, torch.float32, device, backend=backend)
    runner = ModelRunner(model, cache)
    g = torch.Generator().manual_seed(5)
    free = torch.randperm(num_blocks, generator=g).tolist()
    seqs = []
    for i, n in enumerate((5, 33, 16)):  # the last one decodes into a fresh block
        seq = Sequence(i, f"r{i}", 0, torch.randint(3, c.vocab_size, (n,), generator=g).tolist(), SamplingParams())
        seq.block_table = [free.pop() for _ in range(-(-(n + 2) // block))]
        seqs.append(seq)
    logits, _ = runner.run(SchedulerOutput([ScheduledSeq(s, s.num_tokens) for s in seqs]))
    for s, row in zip(seqs, logits.argmax(-1).tolist()):
        s.num_computed = s.num_tokens
        s.output.append(row)
    items = sorted((ScheduledSeq(s, 1) for s in seqs), key=lambda s: s.seq.num_computed)

    want = runner.forward(runner.prepare(items))  # [3, V]
    before = cache.k[:, :, :num_blocks].clone(), cache.v[:, :, :num_blocks].clone()
    runner.prepare_decode(items, bucket)
    got = runner.forward_decode(bucket)  # [bucket, V]
    assert got.shape[0] == bucket
    torch.testing.assert_close(got[:len(items)], want, rtol=1e-5, atol=1e-5)
    # Only the real rows' own slots may change (rewritten with the same values, up to matmul rounding).
    written = [s.seq.block_table[s.seq.num_computed // block] * block + s.seq.num_computed % block for s in items]
    keep = torch.ones(num_blocks * block, dtype=torch.bool, device=device)
    keep[written] = False
    for now, old in zip((cache.k, cache.v), before):
        flat_now = now[:, :, :num_blocks].reshape(c.num_layers, c.num_kv_heads, -1, c.head_dim)
        flat_old = old.reshape(c.num_layers, c.num_kv_heads, -1, c.head_dim)
        assert torch.equal(flat_now[:, :, keep], flat_old[:, :, keep])
    now_k, now_v = cache.k[:, :, :num_blocks].clone(), cache.v[:, :, :num_blocks].clone()

    runner.prepare_decode([], bucket)  # all padding (as a CUDA-graph warm-up lays it out): writes nothing
    assert torch.isfinite(runner.forward_decode(bucket)).all()
    assert torch.equal(cache.k[:, :, :num_blocks], now_k) and torch.equal(cache.v[:, :, :num_blocks], now_v)

    bucketed = ModelRunner(model, cache, decode_buckets=(4, bucket))  # `run` pads the 3 decodes to 4
    logits, sampled = bucketed.run(SchedulerOutput(items))
    assert [s.seq for s in sampled] == [s.seq for s in items]
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)

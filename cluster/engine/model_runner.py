"""Turns a `SchedulerOutput` into one forward pass over the paged cache and returns the logits to sample."""

from __future__ import annotations

import torch

from cluster.engine.paged_cache import AttentionMetadata, PagedKVCache
from cluster.engine.scheduler import ScheduledSeq, SchedulerOutput
from cluster.model.decoder import CausalLM


def step_order(num_computed: int, num_new: int) -> tuple[bool, int]:
    """Sort key of a scheduled sequence: single-token decodes first, shortest context first, so the paged cache
    attends to neighbouring lengths together."""
    return num_new != 1, num_computed + num_new


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.device = model.lm_head.weight.device

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        """Forward the step; return (logits [S, V] fp32, the S scheduled sequences that sample, in that order)."""
        items = sorted(batch.scheduled, key=lambda s: step_order(s.seq.num_computed, s.num_new))
        bs = self.cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in items:
            seq, start = s.seq, s.seq.num_computed
            input_ids += seq.token_slice(start, start + s.num_new)
            positions += range(start, start + s.num_new)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + s.num_new)]
        width = max(len(s.seq.block_table) for s in items)
        tables = torch.tensor([s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in items],
                              dtype=torch.long)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
            query_lens=[s.num_new for s in items],
            context_lens=[s.seq.num_computed + s.num_new for s in items],
            num_decodes=sum(1 for s in items if s.num_new == 1),
        )
        self.cache.begin_step(meta)
        hidden = self.model(torch.tensor(input_ids, device=self.device),
                            torch.tensor(positions, device=self.device), self.cache)  # [T, D]
        ends = torch.tensor(meta.query_lens).cumsum(0) - 1
        sampling = [i for i, s in enumerate(items) if s.samples]
        logits = self.model.compute_logits(hidden[ends[sampling].to(self.device)])
        return logits, [items[i] for i in sampling]

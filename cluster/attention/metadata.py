"""One forward step's layout over the paged KV cache, as the attention backends read it.

Host lists choose paths and sizes on the host (how many decodes, each prefill chunk's length); the device tensors
are all a kernel reads, so a backend that reads only them (and shapes) can be captured in a CUDA graph. The model
runner fills the device tensors from persistent buffers; callers that lay a step out by hand may leave `seq_lens`
and `query_start_loc` out and they are derived from the host lists (a blocking copy, fine outside the engine).

Legend: T = new tokens, B = sequences (decodes first), NB = block-table width.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int32/int64: flat cache slot (block * bs + row) per new token; -1 = padding
    block_tables: torch.Tensor  # [B, NB] int32/int64, padded with 0
    query_lens: list[int]  # new tokens per sequence; the first `num_decodes` are 1
    context_lens: list[int]  # tokens in the cache per sequence after this step (0 = a padding row)
    num_decodes: int
    seq_lens: torch.Tensor | None = None  # [B] int32 on the device: context_lens
    query_start_loc: torch.Tensor | None = None  # [B + 1] int32 on the device: running sum of query_lens

    def __post_init__(self) -> None:
        device = self.block_tables.device
        if self.seq_lens is None:
            self.seq_lens = torch.tensor(self.context_lens, dtype=torch.int32).to(device)
        if self.query_start_loc is None:
            starts = [0, *accumulate(self.query_lens)]
            self.query_start_loc = torch.tensor(starts, dtype=torch.int32).to(device)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

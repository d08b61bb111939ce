"""`StepInputs`: one forward's inputs on the device, as the model runner lays them out and the decode graphs
(`cluster.engine.cuda_graphs`, `cluster.engine.piecewise_graphs`) read them; `PendingTokens`: the draws of a step
still running, which a step scheduled ahead of its outputs takes as inputs on the device.

Legend: T = new tokens, S = sequences that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.engine.prompt_logprobs import PromptScoring


@dataclass
class StepInputs:
    """One forward's inputs, all on the device (views of persistent buffers)."""

    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [S] int32: the hidden row whose logits each sampling sequence needs
    sample_rows: torch.Tensor | None = None  # static decodes: [bucket] int32, rows of the logits that sample first
    scoring: PromptScoring | None = None  # the rows that score prompt tokens, if any
    table_rows: torch.Tensor | None = None  # static decodes: [bucket] int32, each row's device block-table row


@dataclass(frozen=True)
class PendingTokens:
    """The tokens a step drew (on the device, not yet read back), for the sequences whose next input they are."""

    tokens: torch.Tensor  # [S] int64 on the device, in that step's sampling order
    index: dict[int, int]  # seq_id -> its row of `tokens`

"""`StepInputs`: one forward's inputs on the device, as the model runner lays them out and the decode graphs
(`cluster.engine.cuda_graphs`, `cluster.engine.piecewise_graphs`) read them.

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

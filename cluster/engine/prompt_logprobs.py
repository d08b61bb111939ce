"""Prompt logprobs: each prompt token's logprob given the tokens before it, and its top alternatives, read from the
hidden rows of the prefill chunks that compute the prompt (the legacy completions' `echo` with `logprobs`).

The sequence that scores a prompt (`Sequence.scores_prompt`: choice 0 of a request with `prompt_logprobs`) computes
every prompt position itself: cached blocks have no logits, so the scheduler skips the prefix cache for it. The row
of position p scores prompt token p + 1; a chunk scores the positions it computes that were not scored before (a
preempted sequence recomputes its prompt without scoring it twice). The rows go through the lm_head `SCORE_ROWS` at a
time, so a step holds at most `SCORE_ROWS` x V fp32 logits for them (and their log-softmax) however large its token
budget; only each row's chosen logprob and its top K leave the device.

Legend: T = the step's tokens, D = hidden size, R = rows scored this step, r = rows of one slice, V = vocab,
K = alternatives (the most any scoring sequence of the step asks for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.engine.outputs import TokenLogprobs
from cluster.engine.scheduler import ScheduledSeq
from cluster.model.decoder import CausalLM

SCORE_ROWS = 256  # prompt rows put through the lm_head at once: 256 x 32768 fp32 logits are 32 MiB


@dataclass
class PromptRows:
    """The rows of a step that score prompt tokens, laid out on the host with the step."""

    items: list[tuple[ScheduledSeq, int]]  # each scoring sequence and how many of the rows are its, in row order
    rows: np.ndarray  # [R] int32: rows of the step's hidden states
    targets: np.ndarray  # [R] int32: the prompt token each row's logits score
    top: int  # K

    @classmethod
    def of(cls, items: list[ScheduledSeq], query_starts: np.ndarray) -> PromptRows | None:
        """The scoring rows of a step whose sequence i's new tokens start at row `query_starts[i]`; None if none."""
        scoring, rows, targets = [], [], []
        for i, s in enumerate(items):
            seq = s.seq
            if not seq.scores_prompt:
                continue
            assert seq.prompt_logprobs is not None
            first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)  # the first position not scored yet
            end = min(seq.num_computed + s.num_new, len(seq.prompt) - 1)  # the last prompt position predicts nothing
            if first >= end:
                continue
            start = int(query_starts[i]) - seq.num_computed  # the row of position 0
            rows.append(np.arange(start + first, start + end, dtype=np.int32))
            targets.append(np.asarray(seq.prompt[first + 1:end + 1], dtype=np.int32))
            scoring.append((s, end - first))
        if not scoring:
            return None
        top = max(s.seq.params.prompt_logprobs or 0 for s, _ in scoring)
        return cls(scoring, np.concatenate(rows), np.concatenate(targets), top)


@dataclass
class PromptScoring:
    """A step's `PromptRows` with their rows and targets on the device (views of the step's packed inputs)."""

    layout: PromptRows
    rows: torch.Tensor  # [R] int32
    targets: torch.Tensor  # [R] int32

    def score(self, model: CausalLM, hidden: torch.Tensor) -> None:
        """Score the rows of `hidden` [T, D] (the step's final hidden states) and hand each sequence its scores
        (`ScheduledSeq.prompt_logprobs`)."""
        chosen: list[float] = []
        top_ids: list[list[int]] = []
        top_values: list[list[float]] = []
        k = self.layout.top
        for a in range(0, self.rows.shape[0], SCORE_ROWS):
            rows = self.rows[a:a + SCORE_ROWS]
            logprobs = model.compute_logits(hidden[rows]).log_softmax(dim=-1)  # [r, V] fp32
            targets = self.targets[a:a + SCORE_ROWS].long()
            chosen += logprobs.gather(1, targets[:, None])[:, 0].tolist()  # [r]
            if k:
                values, ids = logprobs.topk(k, dim=-1)  # [r, K], best first
                top_values += values.tolist()
                top_ids += ids.tolist()
        at = 0
        for s, count in self.layout.items:
            n = s.seq.params.prompt_logprobs or 0
            s.prompt_logprobs = [TokenLogprobs(chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])) if n else [])
                                 for j in range(at, at + count)]
            at += count

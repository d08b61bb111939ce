"""Iteration-level scheduling: each step fills a token budget with decodes and chunks of prefills.

One rule covers prefill, chunked prefill, decode, prefix-cache hits and resumption after preemption: every
scheduled sequence's `num_computed` catches up with its `num_tokens`, as far as the budget allows (a token sampled
on the device and not yet read back counts: `Sequence.pending`, so the next step can be scheduled while the last one
runs). Running
sequences go first (in admission order), then waiting ones FCFS. When blocks run out, the most recently admitted
running sequence is preempted: its blocks are freed and it later recomputes its tokens (its sampled tokens are
kept, so it resumes exactly where it was).

Two budgets bound a step. Every token counts against `max_num_batched_tokens`; prefill chunks (every sequence with
more than one token to compute) are also charged their cost, attention included (`StepCost`), against as many cost
units. A long prompt, one with more tokens to compute (past its cached prefix) than a step holds, takes at most
`prefill_budget_beside_decodes` units a step while other sequences decode, so that the running streams'
inter-token latency stays within a few times its usual value however long it prefills; shorter prompts are taken
whole, as ordinary traffic is best served (small chunks cost a CPU more per token). The first chunk of a step
always advances by at least one token.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.engine.block_manager import BlockManager
from cluster.engine.outputs import TokenLogprobs
from cluster.engine.sequence import Sequence, Status
from cluster.engine.step_cost import StepCost

if TYPE_CHECKING:
    from cluster.engine.step_inputs import PendingTokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_budget_beside_decodes: int | None = None  # cost units a long prompt may take beside decodes; None: no cap
    cost: StepCost = StepCost(float("inf"))  # the model's (`StepCost.for_model`); the default counts tokens only
    max_model_len: int = 1 << 62  # the model's context: a pending token that reaches it ends its sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens to compute this step
    # Filled by the model runner for a sequence that scores its prompt: the scores of the prompt tokens this chunk's
    # positions predict, in order.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step brings the sequence level with its tokens, so its last logits are sampled."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The only thing handed to the model runner: which sequences advance, by how many tokens."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Set by the engine when scheduled sequences have a pending token (`Sequence.pending`): where its value is.
    pending_tokens: PendingTokens | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = _Budget(self.config, decoding=any(_is_decode(seq) for seq in self.running))
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            seq = self.running[i]
            # A sequence whose pending token ends it (scheduled ahead of the outputs) computes nothing past it.
            num_new = 0 if seq.ends_by_length(self.config.max_model_len) else budget.grant(seq)
            if num_new == 0:  # a prefill the step has no room for; decodes behind it still go
                i += 1
                continue
            while not self.blocks.can_allocate(seq, num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget.spend(seq, num_new)
                i += 1
        if out.preempted:  # memory is short: admit nothing new this step
            return out
        while self.waiting and budget.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            scoring = seq.scores_prompt  # its prompt positions' logits are wanted: cached blocks have none
            seq.num_computed = 0 if scoring else self.blocks.match_prefix(seq)
            seq.num_cached_prompt = min(seq.num_computed, len(seq.prompt))
            num_new = budget.grant(seq)
            if num_new == 0 or not self.blocks.can_allocate(seq, num_new):
                self.blocks.free_sequence(seq)  # a waiting sequence holds no blocks
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(seq, num_new)
            if not scoring:
                self.blocks.count_lookup(len(seq.prompt), seq.num_cached_prompt)
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget.spend(seq, num_new)
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        self.add(seq, front=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence wherever it is (running, waiting, or mid-prefill) and free every block it holds."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason


def _is_decode(seq: Sequence) -> bool:
    return seq.num_tokens - seq.num_computed == 1


class _Budget:
    """One step's room: tokens for everything, cost units for prefill chunks, and fewer units for long prompts in a
    step that decodes."""

    def __init__(self, config: SchedulerConfig, decoding: bool):
        self.cost = config.cost
        self.step = config.max_num_batched_tokens
        self.tokens = self.step
        self.prefill = float(self.step)
        beside = config.prefill_budget_beside_decodes
        self.long = float(beside) if decoding and beside is not None else math.inf
        self.prefilled = False  # whether a chunk has been granted this step

    def grant(self, seq: Sequence) -> int:
        """The tokens `seq` may compute this step (0: none)."""
        todo = min(seq.num_tokens - seq.num_computed, self.tokens)
        if todo <= 1:
            return todo
        room = min(self.prefill, self.long) if self._is_long(seq) else self.prefill
        n = min(todo, self.cost.chunk_within(seq.num_computed, room))
        return n if n or self.prefilled else 1

    def spend(self, seq: Sequence, num_new: int) -> None:
        self.tokens -= num_new
        if seq.num_tokens - seq.num_computed > 1:
            cost = self.cost.of_chunk(seq.num_computed, num_new)
            self.prefill -= cost
            if self._is_long(seq):
                self.long -= cost
            self.prefilled = True

    def _is_long(self, seq: Sequence) -> bool:
        """Whether the sequence had more tokens to compute, when it was admitted, than a step holds."""
        return seq.num_tokens - seq.num_cached_prompt > self.step

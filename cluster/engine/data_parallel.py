"""One rank of data-parallel attention: an engine with its own requests and KV cache whose MoE layers exchange their
tokens with the other ranks' (`cluster.parallel.all_to_all`), each rank holding a shard of the experts.

The ranks step together: an exchange needs every rank, in the same order. So every step each rank says how many
rows it puts through the model (a decode step padded to its bucket counts the bucket) and all learn the most (one
all-reduce, which also picks the exchange's path for every layer of the step); a rank with nothing scheduled while
others step runs one padding row through the model (`ModelRunner.run_padding`), and a rank keeps stepping while any
rank has work (`any_work`, one all-reduce). These agreements are host numbers: over NCCL they belong on a CPU group
(`control`), where they wait for no device work, so steps scheduled ahead still overlap the device.
"""

from __future__ import annotations

import torch.distributed as dist

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.parallel.all_to_all import AllToAllExperts, agree_max


class DataParallelRank:
    def __init__(self, engine: LLMEngine, experts: AllToAllExperts, control: dist.ProcessGroup | None = None):
        """`experts`: the executor `engine`'s model runs its MoE layers with (this rank's shard, the group's
        exchange). `control`: a gloo group of the same ranks for the per-step agreements (None: the exchange's
        group, fine when that one is gloo too)."""
        self.engine = engine
        self.experts = experts
        self.control = control
        engine.step_sync = self._agree

    def _agree(self, rows: int) -> int:
        step = self._most(rows)
        self.experts.begin_step(max(step, 1))  # a padding step runs one row
        return step

    def _most(self, value: int) -> int:
        if self.control is None:
            return self.experts.exchange.agree_tokens(value)
        return agree_max(value, self.control)

    def any_work(self) -> bool:
        """Whether any rank has work: every rank calls this, then steps if it says so."""
        return self._most(int(self.engine.has_work())) > 0

    def step(self) -> list[RequestOutput]:
        """This rank's outputs of one step taken together with the others."""
        return self.engine.step()

    def run(self) -> list[RequestOutput]:
        """Step until no rank has work; every output of this rank's requests, in order."""
        outs: list[RequestOutput] = []
        while self.any_work():
            outs += self.step()
        return outs

"""One rank of data-parallel attention: an engine with its own requests and KV cache whose MoE layers exchange their
tokens with the other ranks' (`cluster.parallel.all_to_all`), each rank holding a shard of the experts.

The ranks step together: an exchange needs every rank, in the same order. So every step each rank says how many
tokens it scheduled and all learn the most (one all-reduce, which also picks the exchange's path for every layer of
the step); a rank with nothing scheduled while others step runs one padding row through the model
(`ModelRunner.run_padding`), and a rank keeps stepping while any rank has work (`any_work`, one all-reduce).
"""

from __future__ import annotations

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.parallel.all_to_all import AllToAllExperts


class DataParallelRank:
    def __init__(self, engine: LLMEngine, experts: AllToAllExperts):
        """`experts`: the executor `engine`'s model runs its MoE layers with (this rank's shard, the group's
        exchange)."""
        self.engine = engine
        self.experts = experts
        engine.step_sync = self._agree

    def _agree(self, tokens: int) -> int:
        step = self.experts.exchange.agree_tokens(tokens)
        self.experts.begin_step(max(step, 1))  # a padding step runs one row
        return step

    def any_work(self) -> bool:
        """Whether any rank has work: every rank calls this, then steps if it says so."""
        return self.experts.exchange.agree_tokens(int(self.engine.has_work())) > 0

    def step(self) -> list[RequestOutput]:
        """This rank's outputs of one step taken together with the others."""
        return self.engine.step()

    def run(self) -> list[RequestOutput]:
        """Step until no rank has work; every output of this rank's requests, in order."""
        outs: list[RequestOutput] = []
        while self.any_work():
            outs += self.step()
        return outs

"""One rank of data-parallel attention: an engine with its own requests and KV cache whose MoE layers exchange their
tokens with the other ranks' (`cluster.parallel.all_to_all`), each rank holding a shard of the experts.

The ranks step together: an exchange needs every rank, in the same order. So every step each rank says how many
rows it puts through the model (a decode step padded to its bucket counts the bucket) and all learn the most (one
all-reduce, which also picks the exchange's path for every layer of the step); a rank with nothing scheduled while
others step runs one padding row through the model (`ModelRunner.run_padding`), and a rank keeps stepping while any
rank has work (`any_work`, one all-reduce). These agreements are host numbers: over NCCL they belong on a CPU group
(`control`), where they wait for no device work, so steps scheduled ahead still overlap the device.

Served (`cluster.engine.async_engine`, the `Lockstep` of a rank's loop), an idle unit agrees every `idle_poll_s`
whether some rank got a request; a failed agreement or exchange (a rank died or hung) disconnects the rank: its
requests then fail with 503 until the unit forms the group again (`connect`).
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from cluster.engine.engine import LLMEngine
from cluster.engine.outputs import RequestOutput
from cluster.parallel.all_to_all import AllToAllExperts, ExpertAllToAll, agree_max
from cluster.parallel.dispatch import UnavailableError
from cluster.parallel.rank_group import RankGroup

log = logging.getLogger(__name__)

# How often idle ranks ask each other for work: the most a request arriving at an idle unit waits for its first step.
IDLE_POLL_S = 0.005


class DataParallelRank:
    idle_poll_s = IDLE_POLL_S

    def __init__(self, engine: LLMEngine, experts: AllToAllExperts, control: dist.ProcessGroup | None = None):
        """`experts`: the executor `engine`'s model runs its MoE layers with (this rank's shard, the group's
        exchange, or none yet). `control`: a gloo group of the same ranks for the per-step agreements (None: the
        exchange's group, fine when that one is gloo too)."""
        self.engine = engine
        self.experts = experts
        self.control = control
        self.group: RankGroup | None = None
        engine.step_sync = self._agree

    @property
    def connected(self) -> bool:
        return self.experts.exchange is not None

    def connect(self, exchange: ExpertAllToAll, control: dist.ProcessGroup | None = None,
                group: RankGroup | None = None) -> None:
        """Step with a (new) group from now on; call between steps, on the thread that steps. `group`: what
        `exchange` and `control` run over, closed by `disconnect`."""
        self.disconnect("the attention ranks are forming their group again")
        self.experts.connect(exchange)
        self.control = control
        self.group = group

    def disconnect(self, reason: str) -> None:
        """Leave the group (its collectives fail at once on the other ranks: a peer's socket or FIFO closes), and
        fail every step with `reason` until the next `connect`."""
        if self.experts.exchange is not None:
            self.experts.drop(reason)
        group, self.group = self.group, None
        if group is not None:
            try:
                group.close()
            except Exception as e:  # a broken group may fail to close; it is dropped all the same
                log.warning("closing the attention ranks' group: %s", _first_line(e))

    def _agree(self, rows: int) -> int:
        step = self._most(rows)
        self.experts.begin_step(max(step, 1))  # a padding step runs one row
        return step

    def _most(self, value: int) -> int:
        exchange = self.experts.exchange
        if exchange is None:
            raise UnavailableError(self.experts.lost)
        try:
            return exchange.agree_tokens(value) if self.control is None else agree_max(value, self.control)
        except RuntimeError as e:  # a peer is gone or hung past the group's timeout: the group is unusable
            self.experts.drop(f"the attention ranks could not agree a step: {_first_line(e)}")
            raise UnavailableError(self.experts.lost) from e

    def any_work(self) -> bool:
        """Whether any rank has work: every rank calls this, then steps if it says so. Raises `UnavailableError`
        when the ranks are not connected."""
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


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else repr(e)

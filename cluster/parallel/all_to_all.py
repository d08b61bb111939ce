"""Expert parallelism as an all-to-all: every rank of a group attends with its own tokens and holds a shard of the
experts (DESIGN.md, "Placement: every GPU attends").

`dispatch.ExpertParallelExecutor` serves one attention replica and many shards. Here each of the R ranks is both: at
each MoE layer it sends every (token, k) pair to the rank that owns expert topk_ids[t, k], runs its own experts on the
rows it received, and sends each result back to the rank its token came from, which sums its token's K terms. Every
rank takes part in every layer's collectives, a rank with no tokens too (it sends an empty batch): a collective needs
the whole group.

Two paths, chosen per call from the step's tokens: the most tokens any rank steps, which every rank must agree on
(`agree_tokens` all-reduces it; an engine does that once a step, not once a layer):
- fixed capacity (the step's tokens <= `max_tokens`): every rank sends every rank exactly C rows, padding included.
  Shapes depend on the step's bucket only, nothing is read back to the host and the buffers are made once, so over
  NCCL a CUDA graph per decode bucket can capture the crossing. C = bucket * min(K, most experts a rank holds): a
  token's K experts are distinct (top-k), so no rank can be sent more than that, and no pair is ever dropped.
  Padding travels too (a collective of static shapes cannot skip it), hence capacities per bucket (`buckets`, the
  engine's decode buckets) rather than one sized for the largest step.
- variable (larger steps, prefill): one small all-to-all of the row counts, read on the host, then the rows with
  those split sizes: no padding, whatever the step's size.

A dispatched row is one pair packed as bytes, [x (D values in x's dtype) | expert id int32 | router weight fp32]:
a dispatch is one collective instead of three, and a small crossing costs its collectives' latency, not its bytes.
Padding rows name expert E, which no rank holds, so every backend skips them (`MoEBackend` skips experts held
elsewhere); a combine sends padding's results to a spare row T that is dropped.

Rounding, as in `dispatch.ExpertParallelExecutor`: the owner applies the router weight and returns one fp32 term per
pair; the source adds its token's terms in fp32 and rounds once to x's dtype. An expert sees the rows of every rank,
rank by rank in token order, as one process does over the ranks' tokens concatenated, and for K = 2 the sum a + b
does not depend on which term arrives first: so the layer equals that one-process layer bit for bit whenever each
expert's matmul does (a backend choosing another path for a shard's row counts changes the last bits only).

One crossing is in flight per `ExpertAllToAll` (its fixed buffers are reused): two overlapping micro-batches take
one each, over the same group.

Legend: R = ranks, E = experts, T = tokens on this rank, K = experts per token, P = T*K pairs, D = hidden,
C = rows one rank sends another in the fixed path, N = rows received, B = bytes of a packed row.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.parallel.dispatch import RoutedBatch, UnavailableError
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shm_collectives import ShmCollectives
from cluster.parallel.shard_worker import ShardWorker

_META_BYTES = 8  # expert id (int32) and router weight (fp32) after each row's activations


@dataclass(frozen=True)
class Crossing:
    """One call's dispatch: the rows this rank received for its experts, and what sends their results home."""

    x: torch.Tensor  # [N, D] x's dtype (a view of the receive buffer)
    topk_ids: torch.Tensor  # [N, 1] int32 global expert ids; E (held by no rank) on padding rows
    topk_weights: torch.Tensor  # [N, 1] fp32
    home: torch.Tensor  # [rows sent] int64: this rank's token of each row it sent; T for padding
    tokens: int  # T
    dtype: torch.dtype  # the output's (x's)
    splits: tuple[list[int], list[int]] | None  # variable path: rows sent to and received from each rank; None: fixed


class ExpertAllToAll:
    """Dispatch and combine over a torch.distributed group whose rank r holds the experts `owners` maps to r.

    `owners` [E]: the rank of each expert (default: `placement.assign_experts`, contiguous and balanced).
    `max_tokens`: the most tokens a rank steps on the fixed path (0: no fixed path); `buckets`: the step sizes its
    capacities are made for (a step rounds up to the first bucket at or above its tokens; default one bucket,
    `max_tokens`).
    `device`: where the group's tensors live (cpu for gloo and shared memory, the rank's GPU for NCCL).
    `group`: a torch.distributed group (None: the default one), or `ShmCollectives` (the ranks of one machine on CPU).
    """

    def __init__(self, group: dist.ProcessGroup | ShmCollectives | None, num_experts: int, top_k: int,
                 max_tokens: int, owners: Sequence[int] | None = None, buckets: Sequence[int] = (),
                 device: torch.device | str = "cpu"):
        self.comm = group if isinstance(group, ShmCollectives) else TorchCollectives(group, device)
        self.num_ranks = self.comm.size()
        self.rank = self.comm.rank()
        self.num_experts = num_experts
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.buckets = tuple(sorted({*buckets, max_tokens})) if max_tokens > 0 else ()  # (): variable path only
        if any(b < 1 or b > max_tokens for b in self.buckets) or (buckets and not max_tokens):
            raise ValueError(f"buckets {tuple(buckets)} must lie within 1..max_tokens ({max_tokens})")
        owners = list(owners) if owners is not None else expert_owners(assign_experts(num_experts, self.num_ranks))
        if len(owners) != num_experts or sorted(set(owners)) != list(range(self.num_ranks)):
            raise ValueError(f"owners {owners}: need one rank per expert, every rank of {self.num_ranks} owning one")
        self.device = torch.device(device)
        self.owners = torch.tensor(owners, dtype=torch.long, device=self.device)  # [E]
        self.experts = tuple(e for e, r in enumerate(owners) if r == self.rank)
        self.pairs_per_rank = min(top_k, max(owners.count(r) for r in range(self.num_ranks)))  # a token's most
        self._buffers: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capacity(self, step_tokens: int) -> int:
        """C: the rows each rank sends each rank on the fixed path for a step of `step_tokens` (<= max_tokens)."""
        return self.buckets[bisect_left(self.buckets, step_tokens)] * self.pairs_per_rank

    def agree_tokens(self, tokens: int) -> int:
        """The most tokens any rank steps (every rank calls it with its own): what `dispatch` takes as step_tokens."""
        return self.comm.all_reduce_max(tokens)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 step_tokens: int) -> Crossing:
        """x [T, D], topk_ids [T, K], topk_weights [T, K] -> the rows this rank's experts run (see `Crossing`).

        `step_tokens`: the step's most tokens on any rank, the same on every rank (`agree_tokens`); at most
        `max_tokens` takes the fixed path. Every rank must call it, in the same order as the others."""
        t, k = topk_ids.shape
        if t > step_tokens:
            raise ValueError(f"{t} tokens on a step agreed at {step_tokens}: the ranks disagree on the step's size")
        fixed = bool(self.buckets) and step_tokens <= self.max_tokens
        dest = self.owners[topk_ids.flatten().long()]  # [P] rank of each pair's expert
        order = torch.argsort(dest, stable=True)  # [P] pairs by destination, each rank's in token order
        sorted_dest = dest[order]
        counts = torch.zeros(self.num_ranks, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, dest, torch.ones_like(dest))  # [R] pairs for each rank (no host sync, unlike bincount)
        starts = counts.cumsum(0) - counts  # [R]
        within = torch.arange(order.numel(), device=x.device) - starts[sorted_dest]  # [P] place in its rank's block
        if fixed:
            cap = self.capacity(step_tokens)
            send, recv = (b[:self.num_ranks * cap] for b in self._fixed(x.dtype, x.shape[1])[:2])
            slot = sorted_dest * cap + within  # [P] row of each sorted pair in the send buffer [R*C, B]
            splits = None
            _views(send, x.shape[1], x.dtype)[1].fill_(self.num_experts)  # every row padding until written
        else:
            received = torch.empty_like(counts)
            self.comm.all_to_all_single(received, counts)
            splits = (counts.tolist(), received.tolist())
            row_bytes = packed_row_bytes(x.shape[1], x.dtype)
            send = torch.empty(order.numel(), row_bytes, dtype=torch.uint8, device=x.device)
            recv = send.new_empty(sum(splits[1]), send.shape[1])
            slot = starts[sorted_dest] + within  # [P] = 0..P-1: sorted pairs are already in rank blocks
        token = order // k  # [P] this rank's token of each sorted pair
        send_x, send_ids, send_w = _views(send, x.shape[1], x.dtype)
        send_x[slot] = x[token]
        send_ids[slot] = topk_ids.flatten()[order].int()
        send_w[slot] = topk_weights.flatten()[order].float()
        if splits is None:
            self.comm.all_to_all_single(recv, send)
        else:
            self.comm.all_to_all_single(recv, send, splits[1], splits[0])
        home = torch.full((send.shape[0],), t, dtype=torch.long, device=x.device)
        home[slot] = token
        recv_x, recv_ids, recv_w = _views(recv, x.shape[1], x.dtype)
        # Ids and weights contiguous: kernels read them flat (the activations' strided rows they index themselves).
        return Crossing(recv_x, recv_ids[:, None].contiguous(), recv_w[:, None].contiguous(), home, t, x.dtype,
                        splits)

    def combine(self, crossing: Crossing, out_rows: torch.Tensor) -> torch.Tensor:
        """out_rows [N, D] fp32 (this rank's experts' weighted output of each received row) -> [T, D] in x's dtype:
        each token's terms, from whichever ranks ran them, summed in fp32 and rounded once."""
        out_rows = out_rows.float().contiguous()
        d = out_rows.shape[1]
        if crossing.splits is None:
            back = self._fixed(crossing.dtype, d)[2][:crossing.home.numel()]
            self.comm.all_to_all_single(back, out_rows)
        else:
            back = out_rows.new_empty(crossing.home.numel(), d)
            self.comm.all_to_all_single(back, out_rows, *crossing.splits)
        out = torch.zeros(crossing.tokens + 1, d, dtype=torch.float32, device=back.device)  # row T: padding's
        out.index_add_(0, crossing.home, back)
        return out[:crossing.tokens].to(crossing.dtype)

    def _fixed(self, dtype: torch.dtype, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed path's send [R*C, B], receive [R*C, B] and result [R*C, D] fp32 buffers for the largest bucket,
        made once per dtype and D (a CUDA graph replays on the same memory); smaller buckets use their first rows."""
        if (dtype, hidden) not in self._buffers:
            rows = self.num_ranks * self.capacity(self.max_tokens)
            send = torch.empty(rows, packed_row_bytes(hidden, dtype), dtype=torch.uint8, device=self.device)
            self._buffers[dtype, hidden] = (send, torch.empty_like(send),
                                    torch.empty(rows, hidden, dtype=torch.float32, device=self.device))
        return self._buffers[dtype, hidden]


class TorchCollectives:
    """The collectives an `ExpertAllToAll` makes, over a torch.distributed group (gloo or NCCL)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device | str):
        self.group = group
        self.device = device

    def size(self) -> int:
        return dist.get_world_size(self.group)

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None) -> None:
        dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=self.group)

    def all_reduce_max(self, value: int) -> int:
        return agree_max(value, self.group, self.device)


class AllToAllExperts:
    """An `ExpertExecutor` (`cluster.moe.executor`) over an all-to-all: each rank's MoE layer calls it with that
    rank's tokens; its experts are `worker`'s (this rank's shard of every layer, `ShardWorker.load`).

    `begin_step(step_tokens)` once a step, on every rank with the same value (`exchange.agree_tokens` of each rank's
    tokens), picks the path of every layer of that step; without it each call agrees for itself (one all-reduce more
    a layer).

    The exchange can change under it (`connect`: a unit re-forms its group after losing a rank). Without one, a call
    raises `UnavailableError`, except `alone()`: then each call runs this rank's experts on its own tokens and the
    others' terms are left out, which is what building an engine needs (its warm-up and cost-probe steps compile and
    time the kernels, and no other rank takes part). A collective that fails drops the exchange (`lost` says why):
    the group is unusable once a peer is gone.
    """

    graph_safe = False  # the fixed path is built for capture over NCCL, but no capture has been checked yet

    def __init__(self, exchange: ExpertAllToAll | None, worker: ShardWorker):
        self.worker = worker
        self.exchange: ExpertAllToAll | None = None
        self.lost = "not connected to the other ranks yet"
        self.step_tokens: int | None = None
        self._alone = False
        if exchange is not None:
            self.connect(exchange)

    def connect(self, exchange: ExpertAllToAll) -> None:
        worker = self.worker
        if worker.expert_ids != exchange.experts or worker.num_experts != exchange.num_experts:
            raise ValueError(f"rank {exchange.rank} owns experts {exchange.experts} of {exchange.num_experts}; "
                             f"its worker holds {worker.expert_ids} of {worker.num_experts}")
        self.exchange = exchange

    def drop(self, reason: str) -> None:
        """Forget the exchange (its group failed); calls raise `UnavailableError(reason)` until the next `connect`."""
        self.exchange, self.lost = None, reason

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Calls within run this rank's experts only (no exchange): for warm-up and probe steps."""
        self._alone = True
        try:
            yield
        finally:
            self._alone = False

    def begin_step(self, step_tokens: int | None) -> None:
        """The step's most tokens on any rank, agreed by all (None: agree at each call)."""
        self.step_tokens = step_tokens

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], topk_ids/topk_weights [T, K] -> [T, D]: this rank's tokens through every rank's experts."""
        worker = self.worker
        exchange = self.exchange
        if exchange is None:
            if not self._alone:
                raise UnavailableError(self.lost)
            return worker.run(RoutedBatch(layer, x, topk_ids, topk_weights.float())).to(x.dtype)
        try:
            step = self.step_tokens if self.step_tokens is not None else exchange.agree_tokens(x.shape[0])
            crossing = exchange.dispatch(x, topk_ids, topk_weights, step)
            # num_experts + 1: the padding's expert id E is a valid index that maps to no local expert.
            rows = worker.backend(crossing.x, worker.prepared[layer], crossing.topk_ids, crossing.topk_weights,
                                  worker.num_experts + 1, out_dtype=torch.float32)  # [N, D] fp32, weighted
            return exchange.combine(crossing, rows)
        except RuntimeError as e:  # a peer died or missed the group's timeout (gloo and NCCL raise RuntimeErrors)
            self.drop(f"the exchange between attention ranks failed: {str(e).splitlines()[0] if str(e) else repr(e)}")
            raise UnavailableError(self.lost) from e


def agree_max(value: int, group: dist.ProcessGroup | None, device: torch.device | str = "cpu") -> int:
    """The largest of every rank's `value` (each rank calls it with its own), over `group` on `device`."""
    most = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    return int(most.item())


def largest_message_bytes(tokens: int, top_k: int, hidden: int, dtype: torch.dtype) -> int:
    """The most bytes one rank sends another in one collective of a step of `tokens`: every (token, expert) pair to
    that rank, as dispatched rows or as combined fp32 results (the fixed path's capacity sends no more)."""
    return tokens * top_k * max(packed_row_bytes(hidden, dtype), 4 * hidden)


def packed_row_bytes(hidden: int, dtype: torch.dtype) -> int:
    """B: a row's activations rounded up to 8 bytes (so each field can be viewed in its own dtype), then the meta."""
    return -(-hidden * dtype.itemsize // 8) * 8 + _META_BYTES


def _views(rows: torch.Tensor, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows [N, B] uint8 -> views (x [N, D] dtype, expert ids [N] int32, router weights [N] fp32)."""
    meta = rows.shape[1] - _META_BYTES
    return (rows[:, :hidden * dtype.itemsize].view(dtype), rows[:, meta:meta + 4].view(torch.int32)[:, 0],
            rows[:, meta + 4:].view(torch.float32)[:, 0])

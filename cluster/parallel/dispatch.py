"""The replica's side of expert parallelism: split each layer's routed tokens by shard, then combine.

Legend: T = tokens, N = tokens routed to one shard, D = hidden, K = experts per token, S = shards.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

MAX_PENDING_ROUNDS = 1 << 16  # round times kept between two reads (the oldest go first)


class UnavailableError(RuntimeError):
    """A transport cannot reach its shards now (one died, hung or is being restarted): the step fails, and the
    requests in it get HTTP 503."""


@dataclass(frozen=True)
class RoutedBatch:
    """The tokens one shard runs for one layer: every token with at least one of its K experts on that shard."""

    layer: int
    x: torch.Tensor  # [N, D]
    topk_ids: torch.Tensor  # [N, K] int32 global expert ids; the shard skips those it does not hold
    topk_weights: torch.Tensor  # [N, K] fp32: the router's weights, unrounded (they scale fp32 partial sums)


class ExpertTransport(Protocol):
    """Carries routed batches to the shards and their outputs back; one implementation per way of reaching them."""

    num_shards: int
    max_rows: int | None  # the most tokens one round may send a shard (None: no limit)

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        """Send batch i to shard i (None: nothing for it this layer) -> each shard's [N_i, D] fp32 partial sum.

        The partials may be views of the transport's own buffers: read them before the next `run`.
        Raises `UnavailableError` when a shard cannot be reached."""
        ...

    def close(self) -> None:
        ...


class SplitPhaseTransport(ExpertTransport, Protocol):
    """A transport whose round can be split: `post` sends, `collect` waits for the replies (`run` = both), so the
    caller can work in between (`cluster.parallel.hybrid` computes the replica's own shard there).

    A failed round marks it `broken` (it is never reused) and raises `UnavailableError`; `late_ranks` then holds the
    channel ranks (1..num_shards) that missed the deadline, hung rather than gone. `abort` marks it broken and tears it
    down without waiting for any peer, from any thread."""

    broken: bool
    late_ranks: tuple[int, ...]

    def post(self, batches: list[RoutedBatch | None]) -> None:
        ...

    def collect(self) -> list[torch.Tensor | None]:
        ...

    def abort(self) -> None:
        ...


class ExpertParallelExecutor:
    """An `ExpertExecutor` whose experts live on shards behind a transport.

    Combining adds nothing to the rounding: shards return fp32 partial sums, added here and rounded once, the way
    one process accumulates the same top-2 terms (a + b is the same whichever shard holds which). So the split
    layer equals the whole one bit for bit whenever each expert's matmul does (a shard may pick the batched path
    where the whole layer did not, which changes the last bits only).

    Up to `broadcast_rows` tokens (decode batches) every shard gets the whole layer's tokens: splitting them costs
    more than the bytes it saves (a dozen small ops a layer, against a few tens of KB sent).
    Larger batches (prefill) are split, so each shard receives only the tokens routed to it.

    Timing, for metrics: each round's host-side duration (two clock reads a layer) is kept, the last
    `MAX_PENDING_ROUNDS` of them, until `drain_round_times` hands them out: until the last reply over a channel, only
    the launch for shards in this process on a GPU. `probe` times a one-token round to each shard alone
    (synchronized), which tells the shards apart (a step's round ends with its slowest).
    """

    graph_safe = False  # a round waits on other processes: CUDA graphs capture around it (piecewise)

    def __init__(self, transport: ExpertTransport, expert_owners: list[int], broadcast_rows: int = 64):
        self.transport = transport
        self.broadcast_rows = broadcast_rows
        self.owners = torch.tensor(expert_owners, dtype=torch.long)  # [E] shard of each expert
        self._owners_on: dict[torch.device, torch.Tensor] = {}
        self._round_times: deque[float] = deque(maxlen=MAX_PENDING_ROUNDS)  # host seconds of each round

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        topk_weights = topk_weights.float()  # RoutedBatch's contract (free when the router already gives fp32)
        limit = self.transport.max_rows or x.shape[0]
        if x.shape[0] <= limit:
            return self._round(layer, x, topk_ids, topk_weights)
        parts = [self._round(layer, *chunk) for chunk in
                 zip(x.split(limit), topk_ids.split(limit), topk_weights.split(limit))]
        return torch.cat(parts)

    def _round(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        shards = self.transport.num_shards
        if shards == 1 or x.shape[0] <= self.broadcast_rows:
            # Every shard gets every token (one frame packed once); each adds only its own experts' terms.
            whole = RoutedBatch(layer, x, topk_ids, topk_weights)
            partials = self._timed([whole] * shards)
            out = partials[0] + partials[1] if shards > 1 else partials[0].clone()
            for partial in partials[2:]:
                out += partial
            return out.to(x.dtype)
        owner = self._owners(x.device)[topk_ids.long()]  # [T, K] shard of each chosen expert
        rows, batches = [], []
        for s in range(shards):
            r = (owner == s).any(dim=1).nonzero().squeeze(1)  # [N_s]
            rows.append(r)
            batches.append(RoutedBatch(layer, x[r], topk_ids[r], topk_weights[r]) if r.numel() else None)
        partials = self._timed(batches)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        for r, partial in zip(rows, partials):
            if partial is not None:
                out.index_add_(0, r, partial)
        return out.to(x.dtype)

    def _timed(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        t0 = time.perf_counter()
        partials = self.transport.run(batches)
        self._round_times.append(time.perf_counter() - t0)
        return partials

    def drain_round_times(self) -> list[float]:
        """Host seconds of each round since the last call, oldest first. Call on the thread that steps."""
        times = self._round_times
        return [times.popleft() for _ in range(len(times))]

    @torch.inference_mode()  # as a step's rounds: the channel's buffers, made in steps, are inference tensors
    def probe(self, x: torch.Tensor, top_k: int) -> list[float]:
        """Seconds of a one-token round of layer 0 sent to each shard alone, in shard order. x [1, D]: the token
        (any values, in the model's dtype and device); its K choices all name one expert of the shard. Call between
        steps, on the thread that steps; raises `UnavailableError` when a shard cannot be reached."""
        owners = self.owners.tolist()
        weights = torch.full((1, top_k), 1.0 / top_k, dtype=torch.float32, device=x.device)
        seconds = []
        for s in range(self.transport.num_shards):
            ids = torch.full((1, top_k), owners.index(s), dtype=torch.long, device=x.device)
            batches: list[RoutedBatch | None] = [None] * self.transport.num_shards
            batches[s] = RoutedBatch(0, x, ids, weights)
            _sync(x.device)
            t0 = time.perf_counter()
            self.transport.run(batches)
            _sync(x.device)  # a shard in this process computes asynchronously on a GPU
            seconds.append(time.perf_counter() - t0)
        return seconds

    def _owners(self, device: torch.device) -> torch.Tensor:
        if device not in self._owners_on:
            self._owners_on[device] = self.owners.to(device)
        return self._owners_on[device]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

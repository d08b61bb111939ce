"""Prefix-aware routing of `generate` calls across serving units: a Serve request router for the AttentionRouter.

Each unit (one AttentionRouter replica) has its own paged KV cache and prefix cache. Serve's default router picks a
replica by power of two choices, so requests that share a system prompt land on any unit, and each unit computes
that prefix again. This router sends a request to the unit that last took the longest prefix of its prompt, keyed
as the engine keys its prefix cache: the sha256 block chain of cluster/engine/block_manager.py, rooted at the
request's cache_salt (requests with different salts never share a key).

    chain: the keys of the prompt's first full blocks (at most `max_blocks`), as the engine registers them
    table: key -> the replica that last took a prompt holding that block (LRU, at most `max_entries` keys)

Per `generate` call: the replica holding the deepest key of the chain, if it covers at least `min_match` of the
chain, is tried first, unless it carries more than `imbalance_threshold` requests beyond the least loaded replica
(so one hot prefix spreads over units instead of pinning one); then Serve's power of two choices. No full block, no
match, or another method (`health`, `shard_info`): power of two choices alone. The table learns where each request
was accepted (`on_request_routed`), so a prefix that spilled to another unit is followed there; replicas that leave
drop out of it.

The router runs in each caller's process (each Ingress replica keeps its own table); per request it hashes at most
`max_blocks` blocks of the token ids the call already carries: no tokenizing, no copy of the prompt.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Container, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.engine.block_manager import block_hash, chain_root
from cluster.engine.config import EngineConfig
from cluster.serve.args import ServeArgs

if TYPE_CHECKING:
    from ray.serve._private.common import RequestMetadata

ROUTED_METHOD = "generate"  # AttentionRouter.generate(request_id, prompt, params, stream)
_PENDING_CHAINS = 4096  # chains kept from a call's choice to its routing (a refused or cancelled one ages out)

H = TypeVar("H", bound=Hashable)  # what the table names a replica by


def prompt_chain(prompt: list[int], cache_salt: str | None, block_size: int, max_blocks: int) -> list[bytes]:
    """The prefix-cache keys of the prompt's first full blocks (at most `max_blocks`), as the engine computes them."""
    parent = chain_root(cache_salt)
    chain = []
    for start in range(0, min(len(prompt) // block_size, max_blocks) * block_size, block_size):
        parent = block_hash(parent, prompt[start:start + block_size])
        chain.append(parent)
    return chain


class PrefixTable(Generic[H]):
    """Block-chain key -> the replica that last took a prompt holding that block; the least recently recorded
    keys are dropped past `max_entries`."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._holders: OrderedDict[bytes, H] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def longest_match(self, chain: Sequence[bytes], serving: Container[H]) -> tuple[int, H | None]:
        """(blocks matched, their holder) for the deepest key of `chain` held by a replica in `serving`; (0, None)."""
        for depth in range(len(chain), 0, -1):
            holder = self._holders.get(chain[depth - 1])
            if holder is not None and holder in serving:
                return depth, holder
        return 0, None

    def record(self, chain: Sequence[bytes], holder: H) -> None:
        for key in chain:
            self._holders[key] = holder
            self._holders.move_to_end(key)
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def forget(self, gone: Container[H]) -> None:
        for key in [key for key, holder in self._holders.items() if holder in gone]:
            del self._holders[key]


class PrefixAffinityRouter(RequestRouter):
    """Serve's request router for the AttentionRouter deployment (see the module's docstring). Its
    `request_router_kwargs` are `initialize_state`'s arguments."""

    def initialize_state(self, block_size: int = 16, max_blocks: int = 128, max_entries: int = 1 << 16,
                         imbalance_threshold: int = 32, min_match: float = 0.25) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.imbalance_threshold = imbalance_threshold
        self.min_match = min_match
        self.table: PrefixTable[ReplicaID] = PrefixTable(max_entries)
        # Each call's chain from its first choice until it is routed, by its metadata (one object per call).
        self._chains: OrderedDict[int, tuple[RequestMetadata, list[bytes]]] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks to try in order: the prefix's holder alone (when there is one to prefer), then two random others,
        of which Serve takes the one with the shorter queue."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off once every rank was refused
        preferred = self._preferred(candidate_replicas, pending_request)
        others = [r for r in candidate_replicas if r is not preferred]
        ranks = [[preferred]] if preferred is not None else []
        if others:
            ranks.append(random.sample(others, min(2, len(others))))
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        self.table.record(self._chain(pending_request), replica_id)
        self._chains.pop(id(pending_request.metadata), None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self.curr_replicas)
        super().update_replicas(replicas)
        gone = before - set(self.curr_replicas)
        if gone:
            self.table.forget(gone)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget({replica_id})

    def _fulfill_next_pending_request(self, replica: RunningReplica,
                                      request_metadata: RequestMetadata | None = None) -> None:
        """Give the replica to the very call it was chosen for. Serve's own lookup goes by internal request id,
        which the calls an Ingress makes while serving one HTTP request share (a completion of several prompts):
        the second of them would never be given a replica. Its metadata is its own."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

    def _preferred(self, candidates: list[RunningReplica], request: PendingRequest | None) -> RunningReplica | None:
        chain = self._chain(request) if request is not None else []
        if not chain:
            return None
        by_id = {r.replica_id: r for r in candidates}
        depth, holder = self.table.longest_match(chain, by_id)
        if holder is None or depth < self.min_match * len(chain):
            return None
        if self._load(holder) - min(self._load(r.replica_id) for r in candidates) > self.imbalance_threshold:
            return None
        return by_id[holder]

    def _load(self, replica_id: ReplicaID) -> int:
        """Requests on the replica as last known here (unknown: 0; Serve probes it before sending)."""
        return self.replica_queue_len_cache.get(replica_id) or 0

    def _chain(self, request: PendingRequest) -> list[bytes]:
        """The chain of a `generate` call's prompt ([] for other methods), hashed once however often Serve asks
        for the call's ranks."""
        metadata = request.metadata
        if metadata.call_method != ROUTED_METHOD:
            return []
        memo = self._chains.get(id(metadata))
        if memo is None or memo[0] is not metadata:
            memo = self._chains[id(metadata)] = (metadata, self._hash(request))
            while len(self._chains) > _PENDING_CHAINS:
                self._chains.popitem(last=False)
        return memo[1]

    def _hash(self, request: PendingRequest) -> list[bytes]:
        args, kwargs = request.args, request.kwargs
        prompt = args[1] if len(args) > 1 else kwargs.get("prompt")
        params = args[2] if len(args) > 2 else kwargs.get("params")
        if not isinstance(prompt, list):
            return []
        return prompt_chain(prompt, getattr(params, "cache_salt", None), self.block_size, self.max_blocks)


def prefix_router_options(args: ServeArgs) -> dict[str, Any]:
    """The AttentionRouter's `request_router_config` option: this router when `prefix_routing` and prefix caching
    are on (else none: Serve's default). A unit batches `max_num_seqs` sequences a step, so its prefix is preferred
    while it carries at most half a batch more than the least loaded unit."""
    if not (args.prefix_routing and args.enable_prefix_caching):
        return {}
    kwargs = {"block_size": EngineConfig.block_size, "imbalance_threshold": max(1, args.max_num_seqs // 2)}
    path = f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__qualname__}"
    return {"request_router_config": {"request_router_class": path, "request_router_kwargs": kwargs}}

"""The token channel without Ray: frames (fp32 router weights), step deadlines on a real gloo group, and the hybrid
transport (a shard in the replica's process beside channel shards) equal to one process, bit for bit.

Every rank is a thread of this process on its own gloo group; shards serve it with `serve_shard`, as the actors do.
"""

import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cluster.parallel.dispatch import UnavailableError
from cluster.moe.executor import LocalExpertExecutor
from cluster.parallel.channel import ReplicaChannel, abort_group, free_port, open_group, serve_shard, wait_works
from cluster.parallel.dispatch import ExpertParallelExecutor, RoutedBatch
from cluster.parallel.frames import (HEADER_BYTES, ChannelSpec, FrameReader, FrameWriter, pack_body, pack_header,
                                     read_header)
from cluster.parallel.hybrid import HybridTransport
from cluster.parallel.placement import assign_experts, expert_owners
from cluster.parallel.shard_worker import ShardWorker
from tests.test_expert_parallel import D, E, LAYERS, _backend, _layers, _routing

TIMEOUT_S = 1.0
# An upper bound only to tell "failed at its deadline" from "hung until some other timeout" (gloo's own is 30 min):
# far above the deadline, so a loaded machine never trips it.
NOT_HUNG_S = 30.0


def _spec(shards: int, dtype: str = "fp32", **kw) -> ChannelSpec:
    return ChannelSpec("127.0.0.1", free_port("127.0.0.1"), shards, D, 2, dtype, max_rows=48, connect_timeout_s=30,
                       **kw)


class _Shards:
    """Shard threads: each joins the group as its rank, then runs `serve(spec, group)`; `exits` holds their returns."""

    def __init__(self, spec: ChannelSpec, serves: list[Callable[[ChannelSpec, dist.ProcessGroup], str]]):
        self.exits: dict[int, str] = {}
        self.threads = [threading.Thread(target=self._run, args=(spec, rank, serve), daemon=True)
                        for rank, serve in enumerate(serves, start=1)]
        for t in self.threads:
            t.start()

    def _run(self, spec: ChannelSpec, rank: int, serve) -> None:
        self.exits[rank] = serve(spec, open_group(spec, rank))

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), f"shard threads still running; ended: {self.exits}"


def _serving(worker) -> Callable[[ChannelSpec, dist.ProcessGroup], str]:
    return lambda spec, group: serve_shard(spec, group, worker)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown: silent shards wait on it (a never-answering shard thread must still end)."""
    event = threading.Event()
    yield event
    event.set()


def _silent(release: threading.Event) -> Callable[[ChannelSpec, dist.ProcessGroup], str]:
    """A shard that takes its frame and never replies."""
    def serve(spec: ChannelSpec, group: dist.ProcessGroup) -> str:
        buffer = torch.empty(spec.frame_bytes(spec.max_rows), dtype=torch.uint8)
        try:
            group.recv([buffer], 0, 0).wait()
        except RuntimeError:
            pass
        release.wait()
        return "silent"
    return serve


class _Untouchable:
    """Stands in for a process group that must not be used: any use fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the process group was used ({name})")


class _Zeros:
    def run(self, batch: RoutedBatch) -> torch.Tensor:
        return torch.zeros(batch.x.shape, dtype=torch.float32)


def _batch(rows: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> RoutedBatch:
    x, ids, w = _routing(rows, dtype, seed)
    return RoutedBatch(0, x, ids, torch.softmax(torch.randn(rows, 2, generator=torch.Generator().manual_seed(seed)),
                                                -1))  # fp32 weights: most are not bf16 numbers


# --- frames -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_a_frame_round_trip_keeps_fp32_router_weights_exact(dtype):
    spec = _spec(1, dtype)
    batch = _batch(7, spec.dtype, seed=3)
    assert batch.topk_weights.dtype == torch.float32
    assert spec.body_bytes(7) == 7 * (D * spec.element_size + 2 * 4 + 2 * 4)  # x | int32 ids | fp32 weights
    buf = np.zeros(spec.frame_bytes(spec.max_rows), dtype=np.uint8)
    n = FrameWriter(buf, spec).write(batch)
    assert n == HEADER_BYTES + spec.body_bytes(7) and read_header(buf) == [1, 0, 7, 2]
    packed = torch.cat([pack_header(batch).view(torch.uint8), pack_body(batch)])  # the header-then-body form
    assert torch.equal(packed, torch.from_numpy(buf[:n]))
    got = FrameReader(torch.from_numpy(buf[HEADER_BYTES:]), spec).read(read_header(buf))
    assert got.topk_weights.dtype == torch.float32 and torch.equal(got.topk_weights, batch.topk_weights)
    assert got.x.dtype == spec.dtype and torch.equal(got.x, batch.x)
    assert got.topk_ids.dtype == torch.int32 and torch.equal(got.topk_ids, batch.topk_ids)
    # The old frames rounded the weights to the activations' dtype: that loses bits in every dtype but fp32.
    rounded = batch.topk_weights.to(spec.dtype).float()
    assert torch.equal(rounded, batch.topk_weights) == (dtype == "fp32")


def test_bf16_router_weights_are_widened_on_the_wire():
    """A caller still handing bf16 weights gets them widened exactly (bf16 -> fp32 loses nothing)."""
    spec = _spec(1, "bf16")
    batch = _batch(5, torch.bfloat16, seed=4)
    narrow = RoutedBatch(0, batch.x, batch.topk_ids, batch.topk_weights.bfloat16())
    buf = np.zeros(spec.frame_bytes(spec.max_rows), dtype=np.uint8)
    FrameWriter(buf, spec).write(narrow)
    got = FrameReader(torch.from_numpy(buf[HEADER_BYTES:]), spec).read(read_header(buf))
    assert torch.equal(got.topk_weights, narrow.topk_weights.float())
    assert torch.equal(pack_body(narrow), pack_body(RoutedBatch(0, batch.x, batch.topk_ids,
                                                                narrow.topk_weights.float())))


def test_a_row_that_would_misalign_the_4_byte_fields_is_refused():
    with pytest.raises(ValueError, match="4-byte"):
        ChannelSpec("127.0.0.1", 1, 1, 63, 2, "bf16", max_rows=8)


# --- deadlines --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exact_sizes", [False, True], ids=["one-message", "header-then-body"])
def test_a_shard_that_never_replies_fails_the_round_within_the_timeout(release, exact_sizes):
    spec = _spec(2, timeout_s=TIMEOUT_S, exact_sizes=exact_sizes)
    shards = _Shards(spec, [_serving(_Zeros()), _silent(release)])
    channel = ReplicaChannel(spec)
    batch = _batch(4)
    shapes = [None if r is None else tuple(r.shape) for r in channel.run([batch, None])]
    assert shapes == [(4, D), None]  # rank 1 answers; rank 2 got nothing
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match="rank\\(s\\) 2 sent no reply"):
        channel.run([batch, batch])
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < NOT_HUNG_S, elapsed
    assert channel.broken and channel.late_ranks == (2,)
    channel.group = _Untouchable()
    with pytest.raises(UnavailableError, match="reconnecting"):
        channel.run([batch, batch])  # a broken channel is never reused: refused before its group is touched
    channel.group = None
    release.set()
    shards.join(10)  # the group was aborted: the answering shard's loop ended too, without a stop frame
    assert shards.exits[1].startswith("channel closed"), shards.exits


def test_a_shard_that_went_away_fails_the_round_at_once_and_is_not_late(release):
    spec = _spec(2, timeout_s=30)

    def leaves(spec: ChannelSpec, group: dist.ProcessGroup) -> str:
        buffer = torch.empty(spec.frame_bytes(spec.max_rows), dtype=torch.uint8)
        group.recv([buffer], 0, 0).wait()
        abort_group(group)  # its end closes, as when its process dies
        return "left"

    shards = _Shards(spec, [_serving(_Zeros()), leaves])
    channel = ReplicaChannel(spec)
    with pytest.raises(UnavailableError, match="stopped answering"):
        channel.run([_batch(3)] * 2)  # not "sent no reply", which only the 30 s deadline would give
    assert channel.late_ranks == ()
    shards.join(10)


class _FakeWork:
    """An NCCL-like work: `is_completed()` turns true by itself at `done_at` (None: never)."""

    def __init__(self, done_at: float | None):
        self.done_at = done_at
        self.polls = 0
        self.waited = False

    def is_completed(self) -> bool:
        self.polls += 1
        return self.done_at is not None and time.monotonic() >= self.done_at

    def wait(self, timeout=None) -> bool:
        assert self.is_completed(), "a polled work is only waited for once complete"
        self.waited = True
        return True


def test_polled_waits_keep_the_deadline():
    """The NCCL way, whose `wait` would not: poll `is_completed()` until the deadline, then name the late ranks."""
    t0 = time.monotonic()
    works = [(1, _FakeWork(t0)), (2, _FakeWork(None)), (3, _FakeWork(t0 + 0.1)), (3, _FakeWork(None))]
    assert wait_works(works, t0 + TIMEOUT_S, poll=True, spin_s=1e-3) == (2, 3)
    assert TIMEOUT_S <= time.monotonic() - t0 < NOT_HUNG_S
    assert not any(w.waited for _, w in works)


def test_polled_waits_return_once_every_work_completed():
    t0 = time.monotonic()
    works = [(1, _FakeWork(t0 + 0.05)), (2, _FakeWork(t0 + 0.1))]
    assert wait_works(works, t0 + 10 * NOT_HUNG_S, poll=True, spin_s=0.02) == ()
    # Returned when the last work completed, not at the deadline; waited: orders the stream after it.
    assert 0.1 <= time.monotonic() - t0 < NOT_HUNG_S and all(w.waited for _, w in works)
    assert works[1][1].polls > 5  # spun, then slept in short steps: not one long sleep


# --- the hybrid transport ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shards", [2, 3])
def test_hybrid_transport_equals_one_process_bit_for_bit(dtype, shards):
    """Shard 0 in this process, the others over gloo: the executor's output is the whole layer's, bit for bit."""
    groups = assign_experts(E, shards)
    workers = [ShardWorker(_layers(dtype, g), E, _backend(per_expert_only=True)) for g in groups]
    spec = _spec(shards - 1, {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    threads = _Shards(spec, [_serving(w) for w in workers[1:]])
    transport = HybridTransport({0: workers[0]}, ReplicaChannel(spec), tuple(range(1, shards)))
    split = ExpertParallelExecutor(transport, expert_owners(groups))
    whole = LocalExpertExecutor(_layers(dtype), E, _backend(per_expert_only=True))
    try:
        for tokens in (1, 5, 32, 100):  # broadcast, split, and (100 > max_rows 48) split into rounds
            for layer in range(LAYERS):
                x, ids, w = _routing(tokens, dtype, seed=layer * 100 + tokens)
                weights = torch.softmax(torch.randn(tokens, 2, generator=torch.Generator().manual_seed(layer)), -1)
                # One process on the same rounds (the matmuls see the same rows; a unit's steps never exceed them).
                chunks = zip(*(t.split(spec.max_rows) for t in (x, ids, weights)))
                expected = torch.cat([whole(layer, *chunk) for chunk in chunks])
                got = split(layer, x, ids, weights)
                assert got.dtype == dtype and torch.equal(got, expected), (
                    tokens, layer, (got.float() - expected.float()).abs().max())
    finally:
        transport.close()
    threads.join(10)
    assert set(threads.exits.values()) == {"stopped by the replica"}


class _Recorder:
    """A fake channel and local worker that log the order of a round's phases."""

    def __init__(self, log: list[str], num_shards: int):
        self.log = log
        self.num_shards = num_shards
        self.max_rows = 16
        self.broken = False
        self.late_ranks = ()
        self.posted: list[RoutedBatch | None] = []

    def post(self, batches):
        self.log.append("post")
        self.posted = batches

    def collect(self):
        self.log.append("collect")
        return [None if b is None else torch.full(b.x.shape, 10.0 + i) for i, b in enumerate(self.posted)]

    def run(self, batch: RoutedBatch) -> torch.Tensor:  # as the local worker
        self.log.append("local")
        if batch.x.shape[0] == 13:
            raise RuntimeError("local shard failed")
        return torch.ones(batch.x.shape)


def test_hybrid_transport_sends_first_computes_locally_then_collects():
    log: list[str] = []
    remote = _Recorder(log, 2)
    transport = HybridTransport({1: _Recorder(log, 0)}, remote, (0, 2))  # shard 1 local; shards 0, 2 remote
    assert transport.num_shards == 3 and transport.max_rows == 16
    a, b, c = _batch(2), _batch(3), _batch(4)
    out = transport.run([a, b, c])
    assert log == ["post", "local", "collect"]
    assert remote.posted == [a, c]  # channel order: rank 1 is shard 0, rank 2 is shard 2
    assert [o[0, 0].item() for o in out] == [10.0, 1.0, 11.0] and [o.shape[0] for o in out] == [2, 3, 4]
    log.clear()
    with pytest.raises(RuntimeError, match="local shard failed"):
        transport.run([a, _batch(13), None])
    assert log == ["post", "local", "collect"]  # the round is drained even so


def test_hybrid_transport_refuses_shard_maps_that_do_not_add_up():
    remote = _Recorder([], 2)
    with pytest.raises(ValueError, match="2 remote shards on a channel of 1"):
        HybridTransport({0: _Zeros()}, _Recorder([], 1), (1, 2))
    with pytest.raises(ValueError, match="both local and remote"):
        HybridTransport({1: _Zeros()}, remote, (1, 2))
    with pytest.raises(ValueError, match="do not cover"):
        HybridTransport({3: _Zeros()}, remote, (1, 2))


def test_the_executor_hands_shards_fp32_router_weights():
    log: list[str] = []
    remote = _Recorder(log, 2)
    executor = ExpertParallelExecutor(HybridTransport({}, remote, (0, 1)), [0] * 4 + [1] * 4)
    x, ids, w = _routing(3, torch.bfloat16, seed=1)
    executor(0, x, ids, w)
    assert all(b.topk_weights.dtype == torch.float32 and torch.equal(b.topk_weights, w.float()) for b in remote.posted)


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    """Ports the OS hands out by itself can be taken between the choice and the bind (a Ray cluster starting meanwhile
    opens many): free ports come from below that range."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = {free_port("127.0.0.1") for _ in range(20)}
    assert all(20000 <= p < low for p in ports), ports
    assert len(ports) > 1
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

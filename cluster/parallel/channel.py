"""The persistent token channel: replica (rank 0) <-> shards (ranks 1..S) over a torch.distributed group.

(Within one machine on CPU the unit uses `shm_channel`, with the same frames (`frames.py`); this one spans machines
and GPUs.)

Opened once per serving unit (Ray only places the processes and tells them where to meet); each layer then costs
one message to every busy shard and one back, far cheaper than an actor call or a Serve hop per layer.
gloo lets a receive land in a buffer larger than the message, so a frame is one message into a buffer sized for
`max_rows`. NCCL needs matching sizes: with `exact_sizes` the header goes first and the body follows.

A round has a deadline (`timeout_s` after its frames went out) on every backend: a shard that stops answering fails
the step with `UnavailableError` instead of hanging the engine thread. gloo's `Work.wait(timeout)` enforces its
timeout itself (it sleeps on the transfer and wakes when it lands). NCCL's does not (it only orders the current
stream, unless TORCH_NCCL_BLOCKING_WAIT), so on NCCL the replica polls `is_completed()` against the deadline: it
spins briefly, then sleeps in short steps. Past the deadline the channel is broken and its group aborted, without
waiting for the hung peer; the ranks that missed it are kept in `late_ranks` for the unit to restart.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from cluster.parallel.dispatch import RoutedBatch, UnavailableError
from cluster.parallel.frames import (HEADER_BYTES, HEADER_FIELDS, OP_RUN, ChannelSpec, FrameReader, FrameWriter,
                                     pack_body, pack_header, read_header, stop_header)
from cluster.parallel.shard_worker import ShardWorker

__all__ = ["ChannelSpec", "ReplicaChannel", "abort_group", "open_group", "serve_shard", "wait_works"]

log = logging.getLogger(__name__)

_IDLE = timedelta(days=365)  # shards wait for the next layer however long the unit is idle
_POLL_S = 50e-6  # the NCCL replica's sleep between polls, once its spin is over
_CLOSE_TIMEOUT_S = 5.0

Pending = list[tuple[int, dist.Work]]  # (peer rank, work)


def open_group(spec: ChannelSpec, rank: int) -> dist.ProcessGroup:
    """Blocks until all `num_shards + 1` ranks have joined (the replica hosts the store).

    The replica's gloo group times out after `connect_timeout_s` (joining is bounded; every later wait passes its own
    deadline). NCCL's timeout arms its watchdog, which ends the process: the replica's deadline and `abort` do that
    job instead, so both NCCL ends, and the shards (idle between layers), never time out.
    """
    world = spec.num_shards + 1
    store = dist.TCPStore(spec.address, spec.port, world, rank == 0, timeout=timedelta(seconds=spec.connect_timeout_s),
                          wait_for_workers=False)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=spec.connect_timeout_s) if rank == 0
                                     else _IDLE)
    if spec.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _IDLE
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ValueError(f"unknown channel backend {spec.backend!r} (gloo or nccl)")


def abort_group(group: dist.ProcessGroup) -> None:
    """Tear `group` down without waiting for any peer: its pending and later operations fail at once."""
    for name in ("abort", "shutdown"):  # both exist on recent torch; older ones have one or the other
        method = getattr(group, name, None)
        if method is not None:
            try:
                method()
                return
            except RuntimeError as e:
                log.info("%s of the channel's group: %s", name, _first_line(e))


def wait_works(works: Pending, deadline: float, poll: bool, spin_s: float = 0.0) -> tuple[int, ...]:
    """Wait for every work until `deadline` (time.monotonic()) -> the ranks of those still pending then (none: done).

    `poll`: poll `is_completed()` (spinning with `sched_yield` for `spin_s`, then sleeping in short steps) instead of
    `wait(timeout)`, for backends whose wait ignores its timeout (NCCL; gloo's `is_completed()` only turns true
    inside `wait`, so gloo waits). Raises RuntimeError when a work failed first (a peer that went away).
    """
    if poll:
        pending = works
        spin_until = time.monotonic() + spin_s
        while pending:
            pending = [(rank, w) for rank, w in pending if not w.is_completed()]
            now = time.monotonic()
            if pending and now >= deadline:
                return tuple(sorted({rank for rank, _ in pending}))
            if pending and now < spin_until:
                os.sched_yield()
            elif pending:
                time.sleep(_POLL_S)
        for _, work in works:
            work.wait()  # complete: raises if it failed, and orders the current stream after it (NCCL)
        return ()
    for i, (rank, work) in enumerate(works):
        try:  # gloo counts whole milliseconds: 2 ms more make sure it gives up after the deadline, not before
            work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.0) + 2e-3))
        except RuntimeError:
            if time.monotonic() < deadline:
                raise  # failed before its time: the peer went away
            late = {rank}
            for other, rest in works[i + 1:]:  # the others: done by now, or late too
                if other not in late and not _done_by_now(rest):
                    late.add(other)
            return tuple(sorted(late))
    return ()


def _done_by_now(work: dist.Work) -> bool:
    """A gloo work's `is_completed()` only turns true inside `wait`: wait a millisecond (failing it if pending)."""
    try:
        work.wait(timedelta(milliseconds=1))
        return True
    except RuntimeError:
        return False


class ReplicaChannel:
    """The replica's end: a `SplitPhaseTransport` over the group. Any failure raises `UnavailableError`."""

    def __init__(self, spec: ChannelSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.num_shards = spec.num_shards
        self.max_rows = spec.max_rows
        self.device = torch.device(device)
        self.group: dist.ProcessGroup | None = open_group(spec, 0)
        self.broken = False  # set by the first failure; a broken group is never reused
        self.late_ranks: tuple[int, ...] = ()  # the ranks that missed the deadline of the round that broke it
        self._poll = spec.backend != "gloo"
        # Host frames are packed into one reused buffer per shard, through views made once (`FrameWriter`): building
        # each field's tensors afresh costs more than the copies.
        self._staged = not spec.exact_sizes and self.device.type == "cpu"
        self._staging: dict[int, FrameWriter] = {}
        self._round: tuple[float, Pending, list[torch.Tensor | None]] | None = None

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        self.post(batches)
        return self.collect()

    def post(self, batches: list[RoutedBatch | None]) -> None:
        """Send every busy shard its frame and post the receives of the replies; `collect` waits for them."""
        group = self.group
        if self.broken or group is None:
            raise UnavailableError("the expert shards are reconnecting")
        try:
            sends: Pending = []
            recvs: Pending = []
            replies: list[torch.Tensor | None] = []
            frames: dict[int, tuple[torch.Tensor, ...]] = {}  # a batch sent to several shards is packed once
            for s, batch in enumerate(batches):
                if batch is not None:
                    if id(batch) not in frames:
                        frames[id(batch)] = self._staged_frame(s, batch) if self._staged else self._frame(batch)
                    sends += [(s + 1, group.send([part], s + 1, 0)) for part in frames[id(batch)]]
            for s, batch in enumerate(batches):
                reply = None
                if batch is not None:
                    reply = torch.empty(batch.x.shape, dtype=torch.float32, device=self.device)
                    recvs.append((s + 1, group.recv([reply], s + 1, 0)))
                replies.append(reply)
        except RuntimeError as e:
            self._fail(f"an expert shard stopped answering: {_first_line(e)}", e)
        self._round = (time.monotonic() + self.spec.timeout_s, sends + recvs, replies)

    def collect(self) -> list[torch.Tensor | None]:
        """The replies of the posted round: each shard's [N, D] fp32 partial (None where it got no batch)."""
        if self._round is None:
            raise UnavailableError("the expert shards are reconnecting")
        (deadline, works, replies), self._round = self._round, None
        try:
            late = wait_works(works, deadline, self._poll, self.spec.spin_s)
        except RuntimeError as e:
            self._fail(f"an expert shard stopped answering: {_first_line(e)}", e)
        if late:
            self._fail(f"expert shard rank(s) {', '.join(map(str, late))} sent no reply within the step timeout of "
                       f"{self.spec.timeout_s:g}s", late=late)
        return replies

    def abort(self) -> None:
        """Mark the channel broken and tear its group down without waiting for any shard (safe from any thread: a
        round in flight on another thread then fails at once)."""
        self.broken = True
        group, self.group = self.group, None
        if group is not None:
            abort_group(group)

    def close(self) -> None:
        """Tell every shard to leave its loop, then drop the group (shards still waiting see the peer close)."""
        group, self.group = self.group, None
        if group is None or self.broken:
            return
        stop = stop_header(self.device)
        frame = stop if self.spec.exact_sizes else stop.view(torch.uint8)
        try:
            works = [(s + 1, group.send([frame], s + 1, 0)) for s in range(self.num_shards)]
            late = wait_works(works, time.monotonic() + _CLOSE_TIMEOUT_S, self._poll)
            if late:
                log.info("closing the channel: ranks %s did not take the stop frame", late)
                abort_group(group)
        except RuntimeError as e:
            log.info("closing the channel: %s", _first_line(e))

    def _fail(self, message: str, cause: BaseException | None = None, late: tuple[int, ...] = ()) -> NoReturn:
        self.late_ranks = late
        self.abort()
        raise UnavailableError(message) from cause

    def _staged_frame(self, shard: int, batch: RoutedBatch) -> tuple[torch.Tensor]:
        """One message in this shard's staging buffer (free again: every send of the last round was waited for)."""
        if shard not in self._staging:
            buf = np.empty(self.spec.frame_bytes(self.max_rows), dtype=np.uint8)
            self._staging[shard] = FrameWriter(buf, self.spec)
        writer = self._staging[shard]
        return (torch.from_numpy(writer.buf[:writer.write(batch)]),)

    def _frame(self, batch: RoutedBatch) -> tuple[torch.Tensor, ...]:
        """The messages carrying `batch`: (header, body) for exact sizes, else one."""
        header, body = pack_header(batch).to(self.device), pack_body(batch).to(self.device)
        if self.spec.exact_sizes:
            return header, body
        return (torch.cat([header.view(torch.uint8), body]),)


def serve_shard(spec: ChannelSpec, group: dist.ProcessGroup, worker: ShardWorker,
                device: torch.device | str = "cpu") -> str:
    """The shard's loop: receive a frame, run it, reply; until told to stop. Returns why it ended."""
    device = torch.device(device)
    header = torch.empty(HEADER_FIELDS, dtype=torch.int64, device=device)
    buffer = torch.empty(spec.frame_bytes(spec.max_rows), dtype=torch.uint8, device=device)
    host = buffer.numpy() if device.type == "cpu" else None
    frames = FrameReader(buffer if spec.exact_sizes else buffer[HEADER_BYTES:], spec)
    try:
        while True:
            if spec.exact_sizes:
                group.recv([header], 0, 0).wait()
                fields = header.tolist()
                if fields[0] == OP_RUN and 0 <= fields[2] <= spec.max_rows:
                    group.recv([buffer[:spec.body_bytes(fields[2])]], 0, 0).wait()
            else:
                group.recv([buffer], 0, 0).wait()
                fields = read_header(host) if host is not None else buffer[:HEADER_BYTES].view(torch.int64).tolist()
            if fields[0] != OP_RUN:
                return "stopped by the replica"
            if not 0 <= fields[2] <= spec.max_rows:  # an aborted group may leave anything in the buffer
                return f"channel closed: a frame of {fields[2]} rows"
            group.send([worker.run(frames.read(fields))], 0, 0).wait()
    except RuntimeError as e:
        return f"channel closed: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# Ray's workers take ports up to 19999 by default; ports from here up to the OS's ephemeral range are handed out by
# no one but an explicit bind.
_FIRST_QUIET_PORT = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(address: str) -> int:
    """A port free on `address` now, for a meeting point or a server to bind a moment later.

    Chosen below the ephemeral range when there is room: a port the OS picked (bind to 0) can be handed out again to
    any outgoing connection, and a Ray cluster starting meanwhile opens many, so it may be gone by the time it is bound.
    """
    quiet = range(_FIRST_QUIET_PORT, _ephemeral_start())
    for _ in range(64 if len(quiet) > 0 else 0):
        port = quiet[secrets.randbelow(len(quiet))]
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]

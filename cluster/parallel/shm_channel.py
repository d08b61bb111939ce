"""The token channel within one machine: frames in shared memory, a one-byte FIFO message to wake the other side.

Same frames as `cluster.parallel.channel` (`frames.py`: header | x | topk_ids | topk_weights fp32, reply [rows, D]
fp32), but each message costs one wake-up instead of gloo's two (its socket thread, then the waiting thread);
benchmarks/RESULTS.md compares the round trips. The unit uses it when every shard shares the replica's machine and
the tensors live in host memory.

Waiting for a reply, the replica first spins a little (a non-blocking read, then `sched_yield`, so a shard sharing
its core runs) and only then sleeps in `select`. Sleeping costs a wake-up per round (a sizeable share of a 2-shard
round trip) that spinning avoids while the shards answer quickly; when the recent rounds took longer
than the spin budget (ms-scale expert work) the replica sleeps at once, so it does not take CPU from the shards.

Per shard i, in `spec.path`: `mem{i}` (the request frame, then the reply), `req{i}` and `rep{i}` (FIFOs), removed as
soon as both sides have opened them. A side that dies closes its FIFO ends, so the other side reads end-of-file at
once: a lost shard fails the step, never hangs it. A shard that hangs instead misses the round's deadline
(`timeout_s` after its frames went out): the step fails with `UnavailableError` and `late_ranks` names it.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from cluster.parallel.dispatch import RoutedBatch, UnavailableError
from cluster.parallel.frames import HEADER_BYTES, OP_RUN, OP_STOP, ChannelSpec, FrameReader, FrameWriter, read_header
from cluster.parallel.shard_worker import ShardWorker


def shm_directory() -> str:
    """A fresh directory for one channel, in /dev/shm where there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="moe-cluster-", dir=base)


def _sizes(spec: ChannelSpec) -> tuple[int, int]:
    """(request bytes, reply bytes) of one shard's region."""
    return spec.frame_bytes(spec.max_rows), spec.max_rows * spec.hidden * 4


def create_files(spec: ChannelSpec) -> None:
    """The replica creates every shard's region and FIFOs before the shards connect."""
    request, reply = _sizes(spec)
    for i in range(spec.num_shards):
        with open(Path(spec.path) / f"mem{i}", "wb") as f:
            f.truncate(request + reply)
        os.mkfifo(Path(spec.path) / f"req{i}")
        os.mkfifo(Path(spec.path) / f"rep{i}")


class _Region:
    """One shard's request and reply bytes, as plain arrays (slicing an `np.memmap` costs more each time)."""

    def __init__(self, spec: ChannelSpec, shard: int):
        request, reply = _sizes(spec)
        self._map = np.memmap(Path(spec.path) / f"mem{shard}", dtype=np.uint8, mode="r+")
        mem = self._map.view(np.ndarray)
        self.request = mem[:request]
        self.reply = mem[request:request + reply]
        self.hidden = spec.hidden
        self._replies: dict[int, torch.Tensor] = {}

    def reply_rows(self, rows: int) -> torch.Tensor:
        """The reply as a [rows, D] fp32 tensor over the region (made once per row count)."""
        view = self._replies.get(rows)
        if view is None:
            view = self._replies[rows] = torch.from_numpy(self.reply.view(np.float32)[:rows * self.hidden]).view(
                rows, self.hidden)
        return view


class ShmReplicaChannel:
    """The replica's end: a `SplitPhaseTransport`. Opening blocks until every shard has opened its end."""

    def __init__(self, spec: ChannelSpec):
        self.spec = spec
        self.num_shards = spec.num_shards
        self.max_rows = spec.max_rows
        self.broken = False
        self.late_ranks: tuple[int, ...] = ()  # the ranks (shard + 1) that missed the deadline of the failed round
        self._round: tuple[float, list[RoutedBatch | None]] | None = None
        self.waits = ReplyWaits(spec.spin_s)
        self.regions = [_Region(spec, i) for i in range(spec.num_shards)]
        self.writers = [FrameWriter(region.request, spec) for region in self.regions]
        deadline = time.monotonic() + spec.connect_timeout_s
        self.requests, self.replies = [], []
        try:
            for i in range(spec.num_shards):
                self.requests.append(_open_writer(Path(spec.path) / f"req{i}", deadline))
                self.replies.append(os.open(Path(spec.path) / f"rep{i}", os.O_RDONLY | os.O_NONBLOCK))
            for i, fd in enumerate(self.replies):
                _await_hello(fd, i, deadline)  # reply ends stay non-blocking: `_reply` polls them
        except BaseException:
            for fd in self.requests + self.replies:
                os.close(fd)
            raise
        finally:
            # Every side holds its mappings and FIFO ends now (or never will): the names can go, so nothing is
            # left behind however the processes end.
            shutil.rmtree(spec.path, ignore_errors=True)

    def run(self, batches: list[RoutedBatch | None]) -> list[torch.Tensor | None]:
        self.post(batches)
        return self.collect()

    def post(self, batches: list[RoutedBatch | None]) -> None:
        """Write every busy shard's frame and wake it; `collect` waits for the replies."""
        if self.broken:
            raise UnavailableError("the expert shards are reconnecting")
        try:
            packed: dict[int, tuple[np.ndarray, int]] = {}  # a batch sent to several shards is packed once
            for s, batch in enumerate(batches):
                if batch is None:
                    continue
                request = self.regions[s].request
                if id(batch) in packed:
                    frame, n = packed[id(batch)]
                    request[:n] = frame[:n]
                else:
                    packed[id(batch)] = request, self.writers[s].write(batch)
                os.write(self.requests[s], b"q")
        except OSError as e:
            self._fail(f"an expert shard stopped answering: {e}", e)
        self.waits.begin()
        self._round = (time.monotonic() + self.spec.timeout_s, batches)

    def collect(self) -> list[torch.Tensor | None]:
        """The replies of the posted round, as views of the regions (valid until the next round)."""
        if self._round is None:
            raise UnavailableError("the expert shards are reconnecting")
        (deadline, batches), self._round = self._round, None
        replies: list[torch.Tensor | None] = []
        try:
            for s, batch in enumerate(batches):
                if batch is None:
                    replies.append(None)
                    continue
                wake = self.waits.read(self.replies[s], max(0.0, deadline - time.monotonic()))
                if wake is None:
                    late = (s + 1,) + tuple(r + 1 for r, b in enumerate(batches) if r > s and b is not None
                                            and not self._replied(r))
                    self._fail(f"expert shard rank(s) {', '.join(map(str, late))} sent no reply within the step "
                               f"timeout of {self.spec.timeout_s:g}s", late=late)
                if not wake:
                    raise OSError(f"expert shard {s} closed the channel (its process ended)")
                replies.append(self.regions[s].reply_rows(batch.x.shape[0]))
        except OSError as e:
            self._fail(f"an expert shard stopped answering: {e}", e)
        self.waits.end()
        return replies

    def abort(self) -> None:
        """Mark the channel broken (from any thread: a round in flight meets its deadline); `close` releases it."""
        self.broken = True

    def _replied(self, shard: int) -> bool:
        """Whether `shard`'s wake-up byte is in (consumed: the channel is failing anyway)."""
        try:
            return bool(os.read(self.replies[shard], 1))
        except BlockingIOError:
            return False

    def _fail(self, message: str, cause: BaseException | None = None, late: tuple[int, ...] = ()) -> NoReturn:
        self.late_ranks = late
        self.broken = True
        raise UnavailableError(message) from cause

    def close(self) -> None:
        """Stop every shard's loop (or let it read end-of-file)."""
        for s, fd in enumerate(self.requests):
            try:
                if not self.broken:
                    self.regions[s].request[:HEADER_BYTES].view(np.int64)[:] = (OP_STOP, 0, 0, 0)
                    os.write(fd, b"q")
            except OSError:
                pass
        for fd in self.requests + self.replies:
            os.close(fd)
        self.requests, self.replies, self.broken = [], [], True


class ReplyWaits:
    """Spin-then-sleep reads of the replies' wake-up bytes, and when to skip the spin.

    A round spins at most `spin_s` in all. The spin is skipped while the recent rounds (a moving average) took longer
    than that: spinning through ms-long expert work would only take turns from the shards on a shared core.
    """

    def __init__(self, spin_s: float):
        self.spin_s = spin_s
        self.typical_s = 0.0  # moving average of a round's wait
        self._sent = 0.0

    def begin(self) -> None:
        """The round's requests are out."""
        self._sent = time.perf_counter()

    def read(self, fd: int, timeout_s: float) -> bytes | None:
        """The byte a shard writes after its reply; b"" at end-of-file (the shard's process ended), None on timeout."""
        spin_until = self._sent + self.spin_s if self.typical_s <= self.spin_s else 0.0
        while True:
            try:
                return os.read(fd, 1)
            except BlockingIOError:
                pass
            if time.perf_counter() < spin_until:
                os.sched_yield()
            elif not select.select([fd], [], [], timeout_s)[0]:
                return None

    def end(self) -> None:
        """Every reply is in: fold the round's wait into the average."""
        self.typical_s += 0.2 * (time.perf_counter() - self._sent - self.typical_s)


def _open_writer(path: Path, deadline: float) -> int:
    """Open a FIFO's write end once its reader is there (a shard that never comes is an error, not a hang)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            return fd
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise UnavailableError(f"expert shard did not open {path.name}: {e}") from e
            time.sleep(0.001)


def _await_hello(fd: int, shard: int, deadline: float) -> None:
    """The shard's first byte says its reply end is open (until then a read sees end-of-file)."""
    while True:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        try:
            if os.read(fd, 1) == b"h":
                return
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise UnavailableError(f"expert shard {shard} did not open its reply channel")
        time.sleep(0.001)


def serve_shard_shm(spec: ChannelSpec, rank: int, worker: ShardWorker) -> str:
    """The shard's loop over its region; `rank` counts from 1 as in the torch.distributed channel."""
    shard = rank - 1
    region = _Region(spec, shard)
    request = os.open(Path(spec.path) / f"req{shard}", os.O_RDONLY)  # waits for the replica's end
    reply = os.open(Path(spec.path) / f"rep{shard}", os.O_WRONLY)  # the replica opened its end first
    os.write(reply, b"h")
    frames = FrameReader(torch.from_numpy(region.request[HEADER_BYTES:]), spec)
    try:
        while True:
            if not os.read(request, 1):
                return "channel closed: the replica went away"
            header = read_header(region.request)
            if header[0] != OP_RUN:
                return "stopped by the replica"
            batch = frames.read(header)
            region.reply_rows(batch.x.shape[0]).copy_(worker.run(batch))
            os.write(reply, b"r")
    except OSError as e:
        return f"channel closed: {e}"
    finally:
        os.close(request)
        os.close(reply)

"""The shared-memory channel: reply waits (spin first while rounds are short, sleep at once when they are long), and
a round's deadline when a shard stops answering."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from cluster.parallel.dispatch import UnavailableError
from cluster.parallel import shm_channel
from cluster.parallel.dispatch import RoutedBatch
from cluster.parallel.frames import ChannelSpec
from cluster.parallel.shm_channel import ReplyWaits, ShmReplicaChannel, serve_shard_shm


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)  # as the replica holds its reply ends
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def yields(monkeypatch) -> list[int]:
    """Counts the spin's yields (each still yields for real)."""
    count = [0]
    real = os.sched_yield

    def counted() -> None:
        count[0] += 1
        real()

    monkeypatch.setattr(shm_channel.os, "sched_yield", counted)
    return count


def _round(waits: ReplyWaits, r: int, w: int, delay_s: float) -> bytes | None:
    writer = threading.Timer(delay_s, os.write, (w, b"r"))
    waits.begin()
    writer.start()
    got = waits.read(r, 5.0)
    waits.end()
    writer.join()
    return got


def test_a_reply_is_read_whether_it_comes_within_the_spin_or_after(pipe, yields):
    r, w = pipe
    waits = ReplyWaits(spin_s=0.05)
    assert _round(waits, r, w, 0.01) == b"r"  # within the spin
    assert yields[0] > 0
    waits = ReplyWaits(spin_s=0.001)
    assert _round(waits, r, w, 0.05) == b"r"  # after the spin: sleeps in select, then reads


def test_long_rounds_turn_the_spin_off_and_short_ones_back_on(pipe, yields):
    r, w = pipe
    waits = ReplyWaits(spin_s=0.005)
    for _ in range(3):
        _round(waits, r, w, 0.03)
    assert waits.typical_s > waits.spin_s
    before = yields[0]
    _round(waits, r, w, 0.03)
    assert yields[0] == before  # slept at once
    os.write(w, b"r")  # replies already there: rounds of a few microseconds
    for _ in range(20):
        waits.begin()
        waits.read(r, 5.0)
        waits.end()
        os.write(w, b"r")
    assert waits.typical_s < waits.spin_s
    os.read(r, 1)
    before = yields[0]
    _round(waits, r, w, 0.002)
    assert yields[0] > before


def test_a_closed_shard_reads_end_of_file_and_a_silent_one_times_out(pipe):
    r, w = pipe
    waits = ReplyWaits(spin_s=0.001)
    waits.begin()
    t0 = time.monotonic()
    assert waits.read(r, 0.2) is None
    assert 0.15 < time.monotonic() - t0 < 2
    os.close(w)
    waits.begin()
    assert waits.read(r, 5.0) == b""


# --- the channel's step deadline (shard threads, no Ray) --------------------------------------------------------------

def _silent_shm_shard(spec: ChannelSpec, rank: int, release: threading.Event) -> None:
    """Opens its ends like a shard, takes one frame, never replies."""
    shard = rank - 1
    request = os.open(Path(spec.path) / f"req{shard}", os.O_RDONLY)
    reply = os.open(Path(spec.path) / f"rep{shard}", os.O_WRONLY)
    os.write(reply, b"h")
    os.read(request, 1)
    release.wait()
    os.close(request)
    os.close(reply)


class _Zeros:
    def run(self, batch: RoutedBatch) -> torch.Tensor:
        return torch.zeros(batch.x.shape, dtype=torch.float32)


def test_a_shm_shard_that_never_replies_fails_the_round_within_the_timeout():
    spec = ChannelSpec("", 0, 2, 64, 2, "bf16", max_rows=8, backend="shm", path=shm_channel.shm_directory(),
                       timeout_s=1.0, connect_timeout_s=30)
    shm_channel.create_files(spec)
    release = threading.Event()
    exits: list[str] = []
    threads = [threading.Thread(target=lambda: exits.append(serve_shard_shm(spec, 1, _Zeros())), daemon=True),
               threading.Thread(target=_silent_shm_shard, args=(spec, 2, release), daemon=True)]
    for t in threads:
        t.start()
    channel = ShmReplicaChannel(spec)
    try:
        g = torch.Generator().manual_seed(0)
        batch = RoutedBatch(0, torch.randn(3, 64, generator=g).bfloat16(), torch.zeros(3, 2, dtype=torch.int32),
                            torch.rand(3, 2, generator=g))
        assert channel.run([batch, None])[0].shape == (3, 64)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match=r"rank\(s\) 2 sent no reply"):
            channel.run([batch, batch])
        assert 1.0 <= time.monotonic() - t0 < 2.5
        assert channel.broken and channel.late_ranks == (2,)
        with pytest.raises(UnavailableError, match="reconnecting"):
            channel.run([batch, batch])
    finally:
        release.set()
        channel.close()
    for t in threads:
        t.join(10)
    assert exits == ["channel closed: the replica went away"]  # a broken channel sends no stop frame: end-of-file

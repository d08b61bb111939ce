"""The shared-memory channel's reply waits: spin first while rounds are short, sleep at once when they are long."""

import os
import threading
import time

import pytest

from cluster.parallel import shm_channel
from cluster.parallel.shm_channel import ReplyWaits


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

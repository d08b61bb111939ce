"""The shared-memory collectives (`cluster.parallel.shm_collectives`) in one process: two ranks on two threads (the
FIFOs and slots behave as between processes). The multi-process all-to-all runs over them in tests/test_all_to_all.py;
here, what those runs do not reach: slots of odd sizes, refused messages, a peer that goes away, and a failed open
that leaves nothing open."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cluster.parallel.shm_channel import shm_directory
from cluster.parallel.shm_collectives import ShmCollectives, ShmPeerError, create_shm_collectives

SLOT_BYTES = 13  # not a multiple of 8: each slot's length header must stay aligned all the same


@pytest.fixture
def pair():
    """Ranks 0 and 1 of one group, opened together (their barriers met on threads)."""
    path = shm_directory()
    create_shm_collectives(path, 2, SLOT_BYTES)
    meet = threading.Barrier(2, timeout=10)
    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(lambda r: ShmCollectives(path, r, 2, SLOT_BYTES, 5.0, lambda _: meet.wait()), (0, 1)))
    yield ranks
    for rank in ranks:
        rank.close()
    shutil.rmtree(path, ignore_errors=True)


def _both(ranks, fn):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, ranks))


def test_rounds_carry_each_ranks_messages_whatever_the_slot_size(pair):
    for round_ in range(5):  # both parities, twice
        def send(comm: ShmCollectives) -> torch.Tensor:
            sent = torch.arange(2 * 6, dtype=torch.uint8).view(2, 6) + 10 * comm.rank() + round_
            got = torch.empty_like(sent)
            comm.all_to_all_single(got, sent)
            return got

        got0, got1 = _both(pair, send)
        assert got0.tolist() == [[r + i for i in range(6)] for r in (round_, 10 + round_)]
        assert got1.tolist() == [[r + 6 + i for i in range(6)] for r in (round_, 10 + round_)]
    assert _both(pair, lambda comm: comm.all_reduce_max(comm.rank() * 7 - 3)) == [4, 4]


def test_a_message_larger_than_a_slot_is_refused_before_the_round_begins(pair):
    with pytest.raises(ValueError, match="exceeds the slots' 13"):
        pair[0].exchange([torch.zeros(1, dtype=torch.uint8), torch.zeros(14, dtype=torch.uint8)])
    assert pair[0].round == 0


def test_a_peer_that_goes_away_fails_the_round_at_once(pair):
    pair[1].close()
    with pytest.raises(ShmPeerError, match="went away"):
        pair[0].all_reduce_max(1)


def test_a_failed_open_leaves_no_descriptor_open():
    path = shm_directory()
    create_shm_collectives(path, 2, SLOT_BYTES)
    peer = os.open(os.path.join(path, "wake0-1"), os.O_RDONLY | os.O_NONBLOCK)  # rank 1's read end, as if it came
    before = len(os.listdir("/proc/self/fd"))

    def barrier(name: str) -> None:
        if name == "write ends open":  # every end of rank 0 is open by now
            raise TimeoutError("rank 1 never opened its write end")

    with pytest.raises(TimeoutError, match="never opened"):
        ShmCollectives(path, 0, 2, SLOT_BYTES, 5.0, barrier)
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(peer)
    shutil.rmtree(path)

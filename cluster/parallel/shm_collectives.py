"""The attention ranks' collectives within one machine on CPU: messages in shared memory, a one-byte FIFO message
per peer to say they are there (as `shm_channel` does for the replica-and-shards star).

Every collective is one round: each rank writes its message for each peer into that peer's slot, wakes the peer,
then waits for every peer's byte and reads its own slots. Rounds are numbered by call (every rank makes the same
calls in the same order, which a collective requires anyway), and slots alternate between two sets by the round's
parity. Two sets suffice: a rank writes round k + 2 only after finishing round k + 1, which needed the byte each peer
sends once it has finished round k, reads included. A peer may run a round ahead, so its bytes count rounds.

Layout in `path`: `slots`, [R destination][2 parity][R source] slots of 8 bytes (the message's length) + `slot_bytes`;
`wake{src}-{dst}`, one FIFO per ordered pair. The files are sparse: pages are only taken where messages land. Each
rank opens its FIFOs' read ends, all meet (`barrier`), then the write ends; the names are removed once every rank
holds its ends. A rank that dies closes its write ends: its peers read end-of-file at once and fail the round
(`ShmPeerError`, a RuntimeError as torch.distributed's are); one that hangs fails it at `timeout_s`.

Legend: R = ranks.
"""

from __future__ import annotations

import mmap
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cluster.parallel.shm_channel import ReplyWaits

_LENGTH_BYTES = 8
_SPIN_S = 100e-6  # the most a round spins for its peers' bytes before it sleeps in select


class ShmPeerError(RuntimeError):
    """A peer rank died (end-of-file on its FIFO) or missed a round's deadline."""


def _stride(slot_bytes: int) -> int:
    """A slot's bytes: the length, then the message, rounded up to 8 (each slot's length stays 8-byte aligned)."""
    return _LENGTH_BYTES + -(-slot_bytes // 8) * 8


def create_shm_collectives(path: str | Path, ranks: int, slot_bytes: int) -> None:
    """Make the slots file and the FIFOs in `path` (an existing, empty directory of this machine's /dev/shm)."""
    path = Path(path)
    with open(path / "slots", "wb") as f:
        f.truncate(ranks * 2 * ranks * _stride(slot_bytes))
    for src in range(ranks):
        for dst in range(ranks):
            if src != dst:
                os.mkfifo(path / f"wake{src}-{dst}")


class ShmCollectives:
    """One rank's end. `barrier(name)` returns once every rank has called it with `name` (the unit's store)."""

    def __init__(self, path: str | Path, rank: int, ranks: int, slot_bytes: int, timeout_s: float,
                 barrier: Callable[[str], None]):
        path = Path(path)
        self.rank_, self.ranks, self.slot_bytes, self.timeout_s = rank, ranks, slot_bytes, timeout_s
        self.round = 0
        self.waits = ReplyWaits(_SPIN_S)
        with open(path / "slots", "r+b") as f:
            mapped = mmap.mmap(f.fileno(), 0)
        # [dst, parity, src, bytes]; the tensor holds the mapping (it is unmapped when the last view goes)
        self._slots = torch.frombuffer(mapped, dtype=torch.uint8).view(ranks, 2, ranks, _stride(slot_bytes))
        self._inbound: dict[int, int] = {}
        self._outbound: dict[int, int] = {}
        peers = [r for r in range(ranks) if r != rank]
        try:
            for src in peers:
                self._inbound[src] = os.open(path / f"wake{src}-{rank}", os.O_RDONLY | os.O_NONBLOCK)
            barrier("read ends open")
            for dst in peers:
                self._outbound[dst] = os.open(path / f"wake{rank}-{dst}", os.O_WRONLY | os.O_NONBLOCK)
            barrier("write ends open")
        except BaseException:
            self.close()
            raise
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # every rank holds its ends: nothing is left behind

    def rank(self) -> int:
        return self.rank_

    def size(self) -> int:
        return self.ranks

    def exchange(self, messages: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """messages[r]: the bytes (flat uint8, on the CPU) for rank r -> what each rank sent this one, as views of
        the slots (valid until this rank's next collective: its byte lets the peers on to the round that reuses
        them) or, for this rank's own, the message itself."""
        if len(messages) != self.ranks:
            raise ValueError(f"{len(messages)} messages for {self.ranks} ranks")
        largest = max((m.numel() for dst, m in enumerate(messages) if dst != self.rank_), default=0)
        if largest > self.slot_bytes:
            raise ValueError(f"a message of {largest} bytes exceeds the slots' {self.slot_bytes}")
        self.round += 1
        parity = self.round % 2
        for dst, message in enumerate(messages):
            if dst == self.rank_:
                continue
            slot = self._slots[dst, parity, self.rank_]
            slot[:_LENGTH_BYTES].view(torch.int64)[0] = message.numel()
            slot[_LENGTH_BYTES:_LENGTH_BYTES + message.numel()].copy_(message)
        try:
            for fd in self._outbound.values():
                os.write(fd, b"w")
        except OSError as e:  # a peer's read end is gone: it died
            raise ShmPeerError(f"a peer rank went away: {e}") from e
        self._await_peers()
        received = []
        for src in range(self.ranks):
            if src == self.rank_:
                received.append(messages[src])
                continue
            slot = self._slots[self.rank_, parity, src]
            n = int(slot[:_LENGTH_BYTES].view(torch.int64)[0])
            received.append(slot[_LENGTH_BYTES:_LENGTH_BYTES + n])
        return received

    def _await_peers(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        self.waits.begin()
        for src, fd in self._inbound.items():
            wake = self.waits.read(fd, max(0.0, deadline - time.monotonic()))
            if wake is None:
                raise ShmPeerError(f"rank {src} missed the round's deadline of {self.timeout_s:g}s")
            if not wake:
                raise ShmPeerError(f"rank {src} went away (its process ended)")
        self.waits.end()

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None) -> None:
        """As `torch.distributed.all_to_all_single` on dim 0 (equal splits when the sizes are None)."""
        sent = _rows(input, input_split_sizes, self.ranks)
        received = self.exchange([part.reshape(-1).view(torch.uint8) for part in sent])
        for part, got in zip(_rows(output, output_split_sizes, self.ranks), received):
            if got.numel() != part.numel() * part.element_size():
                raise ShmPeerError(f"received {got.numel()} bytes where {part.numel() * part.element_size()} fit: "
                                   "the ranks disagree on the split sizes")
            part.reshape(-1).view(torch.uint8).copy_(got)

    def all_reduce_max(self, value: int) -> int:
        message = torch.tensor([value], dtype=torch.int64).view(torch.uint8)
        return max(int(m.view(torch.int64)[0]) for m in self.exchange([message] * self.ranks))

    def close(self) -> None:
        for fd in [*self._inbound.values(), *self._outbound.values()]:
            os.close(fd)
        self._inbound, self._outbound = {}, {}
        self._slots = torch.empty(0, dtype=torch.uint8)  # the mapping goes with the last view of it


def _rows(t: torch.Tensor, splits: list[int] | None, ranks: int) -> list[torch.Tensor]:
    if not t.is_contiguous():
        raise ValueError("all_to_all_single needs contiguous tensors")
    if splits is None:
        if t.shape[0] % ranks:
            raise ValueError(f"{t.shape[0]} rows do not split equally over {ranks} ranks")
        splits = [t.shape[0] // ranks] * ranks
    return list(t.split(splits))

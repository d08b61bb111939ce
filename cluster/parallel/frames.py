"""The token channel's frames: what the replica and its shards agree on, whichever channel carries them.

Per layer and busy shard (`channel.py` over torch.distributed, `shm_channel.py` in shared memory):
    frame = header int64[4] (op, layer, rows, top_k) | x [rows, D] activations' dtype | topk_ids int32 [rows, K]
            | topk_weights fp32 [rows, K]
    reply = [rows, D] fp32 partial sum
The router weights travel in fp32 whatever the activations' dtype: the expert kernels weight fp32 partial sums with
them, so rounding them to bf16 on the wire would make a shard compute something else than one process does.
Legend: D = hidden, K = experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cluster.dtype import dtype_name, parse_dtype
from cluster.parallel.dispatch import RoutedBatch

OP_STOP, OP_RUN = 0, 1
HEADER_FIELDS = 4  # int64: op, layer, rows, top_k
HEADER_BYTES = HEADER_FIELDS * 8
WEIGHT_DTYPE = torch.float32  # topk_weights on the wire


@dataclass(frozen=True)
class ChannelSpec:
    """Everything both ends need to meet and to agree on frame layouts (pickled to the shards)."""

    address: str
    port: int
    num_shards: int  # shards on this channel (ranks 1..num_shards); a shard running in the replica is not one
    hidden: int
    top_k: int
    dtype: torch.dtype | str  # the activations' dtype; a name ("bf16") is held as its torch.dtype
    max_rows: int  # the most tokens in one frame; the executor splits larger layers into rounds
    backend: str = "gloo"  # "nccl" between GPUs, "shm" within one machine (cluster.parallel.shm_channel)
    path: str = ""  # the "shm" backend's directory
    exact_sizes: bool = False  # header and body as two messages; NCCL needs it, gloo can do either
    timeout_s: float = 120.0  # the replica's longest wait for a round's replies (the step deadline)
    connect_timeout_s: float = 120.0
    spin_s: float = 300e-6  # the replica's longest spin for a round's replies before it sleeps

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))  # frozen: normalised once, here
        if self.hidden * self.element_size % 4:
            raise ValueError(f"hidden size {self.hidden} in {dtype_name(self.dtype)}: a row of x must fill whole "
                             "4-byte words, so that the int32 and fp32 fields after it stay aligned")

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def body_bytes(self, rows: int) -> int:
        """x in the activations' dtype, topk_ids int32, topk_weights fp32."""
        return rows * (self.hidden * self.element_size + self.top_k * 4 + self.top_k * WEIGHT_DTYPE.itemsize)

    def frame_bytes(self, rows: int) -> int:
        return HEADER_BYTES + self.body_bytes(rows)


def read_header(buf: np.ndarray) -> list[int]:
    """(op, layer, rows, top_k) of the frame in `buf`."""
    return buf[:HEADER_BYTES].view(np.int64).tolist()


def stop_header(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.int64, device=device)


def pack_header(batch: RoutedBatch) -> torch.Tensor:
    rows, k = batch.topk_ids.shape
    return torch.tensor([OP_RUN, batch.layer, rows, k], dtype=torch.int64)


def pack_body(batch: RoutedBatch) -> torch.Tensor:
    """The body's bytes, on the batch's device (for the header-then-body form NCCL needs)."""
    parts = (batch.x, batch.topk_ids.to(torch.int32), batch.topk_weights.to(WEIGHT_DTYPE))
    return torch.cat([p.contiguous().view(torch.uint8).flatten() for p in parts])


class FrameWriter:
    """Packs batches into one fixed host buffer by copying into a `FrameReader`'s views of it (half the time of
    building the frame's pieces afresh)."""

    def __init__(self, buf: np.ndarray, spec: ChannelSpec):
        self.buf = buf
        self.spec = spec
        self._header = buf[:HEADER_BYTES].view(np.int64)
        self._body = FrameReader(torch.from_numpy(buf[HEADER_BYTES:]), spec)

    def write(self, batch: RoutedBatch) -> int:
        """-> the frame's length in bytes (`copy_` casts topk_ids to int32 and topk_weights to fp32)."""
        rows, k = batch.topk_ids.shape
        header = (OP_RUN, batch.layer, rows, k)
        self._header[:] = header
        target = self._body.read(header)
        target.x.copy_(batch.x)
        target.topk_ids.copy_(batch.topk_ids)
        target.topk_weights.copy_(batch.topk_weights)
        return self.spec.frame_bytes(rows)


class FrameReader:
    """Frames landing in one fixed buffer, read as batches of views (no copies).

    The views for each (rows, top_k) are made once: making them per frame would sit on the round trip's path.
    """

    def __init__(self, body: torch.Tensor, spec: ChannelSpec):
        self.body = body  # uint8, where every frame body starts
        self.spec = spec
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def read(self, header: Sequence[int]) -> RoutedBatch:
        _, layer, rows, k = header
        views = self._views.get((rows, k))
        if views is None:
            views = self._views[(rows, k)] = self._make_views(rows, k)
        return RoutedBatch(layer, *views)

    def _make_views(self, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [rows, D] | topk_ids int32 [rows, K] | topk_weights fp32 [rows, K] (4-byte aligned: see __post_init__)
        x_end = rows * self.spec.hidden * self.spec.element_size
        ids_end = x_end + rows * k * 4
        w_end = ids_end + rows * k * WEIGHT_DTYPE.itemsize
        body = self.body
        return (body[:x_end].view(self.spec.dtype).view(rows, self.spec.hidden),
                body[x_end:ids_end].view(torch.int32).view(rows, k),
                body[ids_end:w_end].view(WEIGHT_DTYPE).view(rows, k))

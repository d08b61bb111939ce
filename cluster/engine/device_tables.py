"""Sequences' block tables kept on the device, one row each, so that a step sends only the block ids appended since
a sequence's last step instead of its whole table.

A sequence's table only grows while it holds its blocks; freeing them replaces the list (`BlockManager
.free_sequence`), so a row remembers which list it mirrors and how much of it, and starts over when the list is
another. Rows are handed out as sequences first appear and taken back, least recently stepped first, when none is
free. A step's tables are gathered from the rows on the device. Columns past a row's own blocks hold block ids left
by an earlier holder: valid ids, never read (each kernel stops at its row's context).

Legend: R = rows, NB = columns (the most blocks a sequence can hold), B = sequences of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cluster.engine.sequence import Sequence


@dataclass
class _Row:
    seq: Sequence  # held, so that `id(seq)` names no other sequence while the row is kept
    table: list[int]  # the list mirrored (a freed sequence gets a new one)
    synced: int  # how many of its entries the device row holds
    used: int  # the last step that read the row


class DeviceBlockTables:
    def __init__(self, rows: int, width: int, device: torch.device):
        self.width = width
        self.device = device
        self.rows = torch.zeros(rows, width, dtype=torch.int32, device=device)  # [R, NB]
        self._held: list[_Row | None] = [None] * rows
        self._row_of: dict[int, int] = {}  # id(seq) -> row
        self._free = list(range(rows - 1, -1, -1))
        self._step = 0

    def update(self, seqs: list[Sequence]) -> tuple[np.ndarray, list[np.ndarray]]:
        """On the host: each sequence's row [B], and the entries to write since the rows were last synced, as
        [rows, columns, block ids] (each int32 [K]); `write` applies them on the device."""
        self._step += 1
        for seq in seqs:  # first: no row this step reads is reclaimed for another of its sequences
            row = self._row_of.get(id(seq))
            if row is not None:
                self._held[row].used = self._step
        rows = np.empty(len(seqs), dtype=np.int32)
        at: list[int] = []
        cols: list[int] = []
        ids: list[int] = []
        for i, seq in enumerate(seqs):
            row = self._row(seq)
            held = self._held[row]
            if held.table is not seq.block_table:  # freed and given blocks again: the whole table is new
                held.table, held.synced = seq.block_table, 0
            new = seq.block_table[held.synced:]
            if new:
                at += [row] * len(new)
                cols += range(held.synced, held.synced + len(new))
                ids += new
                held.synced += len(new)
            rows[i] = row
        return rows, [np.array(at, np.int32), np.array(cols, np.int32), np.array(ids, np.int32)]

    def write(self, at: torch.Tensor, cols: torch.Tensor, ids: torch.Tensor) -> None:
        """Apply `update`'s entries (on the device, after their copy)."""
        if at.numel():
            self.rows.index_put_((at.long(), cols.long()), ids)

    def _row(self, seq: Sequence) -> int:
        row = self._row_of.get(id(seq))
        if row is not None:
            return row
        if not self._free:
            self._reclaim()
        row = self._free.pop()
        self._held[row] = _Row(seq, seq.block_table, 0, self._step)
        self._row_of[id(seq)] = row
        return row

    def _reclaim(self) -> None:
        """Free the least recently stepped row of an earlier step, or double the rows when all are this step's."""
        stale = [r for r, held in enumerate(self._held) if held is not None and held.used < self._step]
        if stale:
            row = min(stale, key=lambda r: self._held[r].used)
            del self._row_of[id(self._held[row].seq)]
            self._held[row] = None
            self._free.append(row)
            return
        old = self.rows.shape[0]
        self.rows = torch.cat([self.rows, torch.zeros_like(self.rows)])
        self._held += [None] * old
        self._free = list(range(2 * old - 1, old - 1, -1))

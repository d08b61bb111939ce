"""Block tables on the device (`DeviceBlockTables`): a step sends only what was appended, a freed sequence's new
table is written whole, rows are reclaimed least recently stepped first, and the engine's tokens do not change."""

import numpy as np
import torch

from cluster.engine.device_tables import DeviceBlockTables
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence


def _seq(seq_id: int, table: list[int]) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, [1, 2, 3], SamplingParams(), block_table=list(table))


def _step(tables: DeviceBlockTables, seqs: list[Sequence]) -> tuple[np.ndarray, int]:
    """One step's update applied; (each sequence's row, entries sent)."""
    rows, writes = tables.update(seqs)
    tables.write(*(torch.from_numpy(w) for w in writes))
    for row, seq in zip(rows, seqs):  # what the step gathers is the sequence's table
        assert tables.rows[row, :len(seq.block_table)].tolist() == seq.block_table
    return rows, len(writes[0])


def test_only_appended_block_ids_travel():
    tables = DeviceBlockTables(4, 8, torch.device("cpu"))
    a, b = _seq(0, [5, 6]), _seq(1, [9])
    assert _step(tables, [a, b])[1] == 3
    a.block_table.append(7)
    assert _step(tables, [a, b])[1] == 1
    assert _step(tables, [b, a])[1] == 0


def test_a_freed_sequence_is_written_whole_again():
    tables = DeviceBlockTables(4, 8, torch.device("cpu"))
    a = _seq(0, [5, 6, 7])
    row, _ = _step(tables, [a])
    a.block_table = [2, 3]  # freed (preempted), then given blocks again: a new list, as BlockManager makes
    again, sent = _step(tables, [a])
    assert sent == 2 and again[0] == row[0]


def test_rows_are_reclaimed_least_recently_stepped_first_and_grow_when_all_are_in_use():
    tables = DeviceBlockTables(2, 8, torch.device("cpu"))
    a, b, c = _seq(0, [1]), _seq(1, [2]), _seq(2, [3])
    _step(tables, [a])
    _step(tables, [b])
    rows, _ = _step(tables, [c])  # no free row: a's (stepped longest ago) goes to c
    assert rows[0] == 0 and tables.rows.shape[0] == 2
    rows, sent = _step(tables, [a, b, c])  # all three in one step: the rows double; a is written again
    assert tables.rows.shape[0] == 4 and sent == 1 and len(set(rows.tolist())) == 3

"""Device block tables: always equal to the sequences' lists, while copying only what changed."""

from __future__ import annotations

import random

import torch
from tusk.worker.block_tables import DeviceBlockTables


class FakeSeq:
    def __init__(self, blocks: list[int]) -> None:
        self.block_table = blocks


def _check(tables: DeviceBlockTables, seqs: list[FakeSeq]) -> None:
    rows = tables.rows_for(seqs)
    width = max(len(s.block_table) for s in seqs)
    got = tables.select(rows, width)
    assert got.dtype == torch.int32 and got.shape == (len(seqs), width)
    for i, seq in enumerate(seqs):
        assert got[i, : len(seq.block_table)].tolist() == seq.block_table


def test_random_growth_replacement_and_turnover_match_the_lists():
    rng = random.Random(5)
    tables = DeviceBlockTables("cpu", rows=2, cols=2)  # tiny: forces reclaiming and growing
    live = [FakeSeq([rng.randrange(1000)]) for _ in range(3)]
    for _ in range(300):
        action = rng.random()
        seq = rng.choice(live)
        if action < 0.5:
            seq.block_table += [rng.randrange(1000) for _ in range(rng.randrange(0, 3))]
        elif action < 0.6:  # preempted and readmitted: a new list, maybe a shared cached prefix
            seq.block_table = seq.block_table[: rng.randrange(len(seq.block_table) + 1)] + [
                rng.randrange(1000)
            ]
        elif action < 0.65:
            seq.block_table[-1] = rng.randrange(1000)  # an in-place edit of the tail is noticed too
        elif action < 0.75:
            live.remove(seq)
            live.append(FakeSeq([rng.randrange(1000)]))
        batch = rng.sample(live, rng.randrange(1, len(live) + 1))
        _check(tables, batch)
    assert tables.table.shape[0] >= 3 and tables.table.shape[1] >= 2


def test_steady_decode_copies_only_new_blocks():
    seqs = [FakeSeq(list(range(i * 100, i * 100 + 50))) for i in range(8)]
    tables = DeviceBlockTables("cpu")
    _check(tables, seqs)
    assert tables.entries_written == 8 * 50
    _check(tables, seqs)  # nothing changed: nothing copied
    assert tables.entries_written == 8 * 50
    seqs[3].block_table += [7]
    _check(tables, seqs)
    assert tables.entries_written == 8 * 50 + 1

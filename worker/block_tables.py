"""Block tables of the running sequences, kept on the model's device and updated incrementally.

Rebuilding a padded [B, max_blocks] tensor from Python lists every step costs O(B x blocks) host
work and a full host-to-device copy (about 19 ms for 64 sequences of 2,048 blocks). Here each
sequence owns a row of one persistent int32 tensor; a step writes only the entries that changed
since the last one (usually none, or one new block per sequence), then selects the batch's rows.

A sequence's ``block_table`` list only ever grows in place (``+=``) or is replaced by a new list
(admission, preemption, finish), so a row is trusted while it was written from the same list
object, the list is not shorter, and its last written entry is unchanged; otherwise the row is
rewritten. Entries past a sequence's own blocks hold stale (valid) block ids: kernels read only
the blocks its context length covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Row:
    index: int
    owner: object  # the Sequence (held so its id cannot be reused while the row is assigned)
    source: list[int]  # the block_table list object the row was written from
    written: int  # how many of its entries are in the tensor
    last: int = -1  # the last entry written (a changed tail means the list was edited in place)


class DeviceBlockTables:
    """One row of block ids per sequence in a [rows, cols] int32 tensor on ``device``."""

    def __init__(self, device: torch.device | str, rows: int = 64, cols: int = 64) -> None:
        self.device = torch.device(device)
        self.table = torch.zeros((rows, cols), dtype=torch.int32, device=self.device)
        self._rows: dict[int, _Row] = {}
        self._free = list(range(rows - 1, -1, -1))
        self.entries_written = 0  # host-to-device entries copied so far (tests, benchmarks)

    def rows_for(self, seqs: list) -> list[int]:
        """Bring the rows of ``seqs`` (objects with a ``block_table`` list) up to date; their indices."""
        width = max((len(s.block_table) for s in seqs), default=0)
        if width > self.table.shape[1]:
            self._grow(self.table.shape[0], max(width, 2 * self.table.shape[1]))
        rows: list[int] = []
        r_idx: list[int] = []
        c_idx: list[int] = []
        values: list[int] = []
        batch = {id(s) for s in seqs}
        for seq in seqs:
            blocks = seq.block_table
            row = self._rows.get(id(seq))
            if row is None or row.owner is not seq:
                row = self._assign(seq, batch)
            if not (
                row.source is blocks
                and len(blocks) >= row.written
                and (row.written == 0 or blocks[row.written - 1] == row.last)
            ):
                row.source, row.written = blocks, 0
            if len(blocks) > row.written:
                new = blocks[row.written :]
                r_idx += [row.index] * len(new)
                c_idx += range(row.written, len(blocks))
                values += new
                row.written, row.last = len(blocks), blocks[-1]
            rows.append(row.index)
        if values:
            update = torch.tensor([r_idx, c_idx, values], dtype=torch.int64).to(self.device)
            self.table[update[0], update[1]] = update[2].to(torch.int32)
            self.entries_written += len(values)
        return rows

    def select(self, rows: list[int], width: int) -> torch.Tensor:
        """[len(rows), width] block tables of these rows (a contiguous copy)."""
        index = torch.tensor(rows, dtype=torch.int64).to(self.device)
        return self.table[:, :width].index_select(0, index)

    def _assign(self, seq, batch: set[int]) -> _Row:
        stale = self._rows.pop(id(seq), None)  # a finished sequence whose id was reused
        if stale is not None:
            index = stale.index
        else:
            if not self._free:
                # Rows of sequences outside this batch are reclaimed; rewritten if they return.
                for key in [k for k in self._rows if k not in batch]:
                    self._free.append(self._rows.pop(key).index)
            if not self._free:
                old = self.table.shape[0]
                self._grow(2 * old, self.table.shape[1])
                self._free = list(range(2 * old - 1, old - 1, -1))
            index = self._free.pop()
        row = self._rows[id(seq)] = _Row(index, seq, seq.block_table, 0)
        return row

    def _grow(self, rows: int, cols: int) -> None:
        bigger = torch.zeros((rows, cols), dtype=torch.int32, device=self.device)
        bigger[: self.table.shape[0], : self.table.shape[1]] = self.table
        self.table = bigger

"""The worker's host (CPU) LRU cache of KV blocks, between the device cache and the tier.

It holds blocks as encoded tier values (``header | payload``) so a block read from the tier can
be cached without re-encoding and a cached block can be written through without copying. Bounds
are in blocks and bytes; whichever is hit first evicts the least recently used block.
Thread-safe: the engine thread stores snapshots while the event loop serves loads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tusk.kvformat import BlockHeader
from tusk.kvtier import metrics
from tusk.kvtier.events import EventHub, EventKind, Medium


@dataclass(frozen=True)
class CachedBlock:
    header: BlockHeader
    payload: memoryview  # view into ``value``
    value: bytes | bytearray | memoryview  # the whole encoded value, as sent to the tier

    @property
    def nbytes(self) -> int:
        return len(self.value)


class HostBlockCache:
    def __init__(self, max_blocks: int, max_bytes: int | None = None, events: EventHub | None = None) -> None:
        if max_blocks < 0:
            raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self.events = events or EventHub()
        self._blocks: OrderedDict[int, CachedBlock] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, block_hash: int) -> CachedBlock | None:
        with self._lock:
            block = self._blocks.get(block_hash)
            if block is not None:
                self._blocks.move_to_end(block_hash)
        if block is not None:
            metrics.HOST_HITS.inc()
        return block

    def leading_hits(self, hashes: Sequence[int]) -> list[CachedBlock]:
        """Cached blocks for the longest prefix of ``hashes`` that is fully cached."""
        found: list[CachedBlock] = []
        for h in hashes:
            block = self.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def put(self, block_hash: int, block: CachedBlock) -> None:
        if self.max_blocks == 0 or (self.max_bytes is not None and block.nbytes > self.max_bytes):
            return
        evicted: list[int] = []
        with self._lock:
            before_blocks, before_bytes = len(self._blocks), self._bytes
            old = self._blocks.pop(block_hash, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._blocks[block_hash] = block
            self._bytes += block.nbytes
            while len(self._blocks) > self.max_blocks or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                victim, gone = self._blocks.popitem(last=False)
                self._bytes -= gone.nbytes
                evicted.append(victim)
            metrics.HOST_BLOCKS.inc(len(self._blocks) - before_blocks)
            metrics.HOST_BYTES.inc(self._bytes - before_bytes)
        if evicted:
            metrics.HOST_EVICTIONS.inc(len(evicted))
            self.events.emit(EventKind.REMOVED, Medium.HOST, evicted)
        if old is None:
            self.events.emit(EventKind.STORED, Medium.HOST, [block_hash])

    def clear(self) -> None:
        with self._lock:
            count, nbytes = len(self._blocks), self._bytes
            self._blocks.clear()
            self._bytes = 0
        metrics.HOST_BLOCKS.dec(count)
        metrics.HOST_BYTES.dec(nbytes)
        self.events.emit(EventKind.CLEARED, Medium.HOST)

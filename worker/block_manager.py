"""Paged KV block bookkeeping: reference counts, prefix caching by block hash, LRU eviction.

A block is in exactly one of three states:

* referenced (``ref > 0``): part of at least one running sequence's block table;
* cached (``ref == 0`` with a hash): holds a full block of some prefix, reusable by any request
  whose prefix hashes to it, and evictable in least-recently-released order;
* free (``ref == 0`` without a hash): holds nothing of value.

Only *full* blocks get a hash (``tusk.hashing.block_hashes`` covers the block's tokens and all
before it), so a hit means the block's KV is exactly what the new request would compute.
Every change to the set of hashed blocks is recorded as a KV event for the router's index.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockEvent:
    stored: bool  # True = now cached here, False = evicted
    block_hash: int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._events: list[BlockEvent] = []

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that an allocation could take now (free plus evictable cached blocks)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def cached_prefix_len(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` are cached here (no references taken)."""
        n = 0
        for h in hashes:
            if h not in self._by_hash:
                break
            n += 1
        return n

    def block_hash(self, block_id: int) -> int | None:
        return self._hash[block_id]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    # -- mutations -------------------------------------------------------------------------
    def acquire_cached(self, hashes: list[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of ``hashes``."""
        ids: list[int] = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            ids.append(block)
        return ids

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (evicting cached ones LRU if needed), or None if there are not enough."""
        if n > self.num_free:
            return None
        ids = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self._ref[block] = 1
            ids.append(block)
        return ids

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block; tail blocks are released first so they evict first."""
        for block in reversed(block_ids):
            self._ref[block] -= 1
            if self._ref[block] < 0:
                raise AssertionError(f"block {block} released more often than acquired")
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def register(self, block_id: int, block_hash: int) -> bool:
        """Record that ``block_id`` now holds the full block ``block_hash``; False if already cached.

        A duplicate (two requests computed the same block at once) stays private to its sequence
        and returns to the free pool when released.
        """
        if self._hash[block_id] is not None or block_hash in self._by_hash:
            return False
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        self._events.append(BlockEvent(True, block_hash))
        return True

    def drain_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def reset_cache(self) -> int:
        """Forget every unreferenced cached block (e.g. after a model reload); returns how many."""
        n = 0
        while self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._free.append(block)
            n += 1
        return n

    def _forget(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            self._hash[block] = None
            del self._by_hash[h]
            self._events.append(BlockEvent(False, h))

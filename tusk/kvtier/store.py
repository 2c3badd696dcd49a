"""The worker's block store below the device cache: host LRU first, then the shared tier.

Reads serve the longest prefix a request can reuse: blocks come from the host cache while they
are there, then from the tier in pipelined chunks, and stop at the first miss (a block past a gap
is useless, since its KV depends on every block before it). The next chunk's fetch is already in
flight while the caller copies the current chunk into the device cache.

Writes go to the host cache at once and to the tier in the background. A prefill worker must not
answer its Prefill RPC before that request's blocks are durable, or the decode worker would miss
them and recompute; ``flush(request_id)`` is the awaitable it waits on, bounded by a timeout
after which the blocks not yet written are simply misses for the decode side.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence

from tusk.kvformat import CorruptBlock, decode_block
from tusk.kvtier.client import KVTierClient
from tusk.kvtier.events import EventHub, EventKind, Medium
from tusk.kvtier.host_cache import CachedBlock, HostBlockCache

log = logging.getLogger(__name__)


class TieredBlockStore:
    def __init__(
        self,
        host: HostBlockCache | None,
        tier: KVTierClient | None,
        *,
        events: EventHub | None = None,
        write_through: bool = True,
    ) -> None:
        self.events = events or (host.events if host is not None else EventHub())
        if host is not None:
            host.events = self.events
        self.host = host
        self.tier = tier
        self.write_through = write_through and tier is not None
        self._pending: dict[str, list[tuple[asyncio.Task[int] | None, int]]] = defaultdict(list)

    # -- reads -----------------------------------------------------------------------------

    async def fetch_prefix(
        self, hashes: Sequence[int], chunk_blocks: int = 16
    ) -> AsyncIterator[list[CachedBlock]]:
        """Yield chunks of consecutive leading blocks found in host cache or tier, in order.

        While the caller processes a yielded chunk, the next tier chunk is being fetched.
        """
        if chunk_blocks <= 0:
            raise ValueError(f"chunk_blocks must be positive, got {chunk_blocks}")
        local = self.host.leading_hits(hashes) if self.host is not None else []
        for start in range(0, len(local), chunk_blocks):
            yield local[start : start + chunk_blocks]
        rest = list(hashes[len(local) :])
        if not rest or self.tier is None:
            return
        chunks = [rest[i : i + chunk_blocks] for i in range(0, len(rest), chunk_blocks)]
        pending = asyncio.ensure_future(self._fetch_chunk(chunks[0]))
        try:
            for index in range(len(chunks)):
                blocks = await pending
                complete = len(blocks) == len(chunks[index])
                if complete and index + 1 < len(chunks):
                    pending = asyncio.ensure_future(self._fetch_chunk(chunks[index + 1]))
                if blocks:
                    yield blocks
                if not complete:
                    return
        finally:
            if not pending.done():
                pending.cancel()

    async def _fetch_chunk(self, hashes: list[int]) -> list[CachedBlock]:
        """Leading hits of one tier chunk, also stored in the host cache."""
        assert self.tier is not None
        results = await self.tier.get_blocks(hashes)
        found: list[CachedBlock] = []
        for h, result in zip(hashes, results, strict=True):
            if result is None:
                break
            header, payload = result
            block = CachedBlock(header, payload, payload.obj)
            found.append(block)
            if self.host is not None:
                self.host.put(h, block)
        return found

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        """Host hits, else one tier round trip for the rest."""
        local = [self.host is not None and h in self.host for h in hashes]
        missing = [h for h, hit in zip(hashes, local, strict=True) if not hit]
        if not missing or self.tier is None:
            return local
        remote = iter(await self.tier.contains(missing))
        return [hit or next(remote) for hit in local]

    # -- writes ----------------------------------------------------------------------------

    def store(
        self, request_id: str | None, hashes: Sequence[int], values: Sequence[bytes | memoryview]
    ) -> asyncio.Task[int] | None:
        """Keep blocks (encoded values) in the host cache and write them through in the background.

        Returns the background write (its result: blocks written), or None if there is none
        (no tier, write-through off, or dropped by the in-flight bound). With a ``request_id``
        the write is also tracked for ``flush``. Must be called on the tier client's event loop.
        """
        if len(hashes) != len(values):
            raise ValueError(f"{len(hashes)} hashes but {len(values)} values")
        if not hashes:
            return None
        if self.host is not None:
            for h, value in zip(hashes, values, strict=True):
                try:
                    header, payload = decode_block(value)
                except CorruptBlock:
                    log.exception("refusing to cache a malformed block value")
                    continue
                self.host.put(h, CachedBlock(header, payload, value))
        if not self.write_through:
            return None
        assert self.tier is not None
        task = self.tier.write_behind(hashes, values)
        if task is not None:
            task.add_done_callback(lambda t, hs=tuple(hashes): self._written(t, hs))
        if request_id is not None:
            self._pending[request_id].append((task, len(hashes)))
        return task

    def _written(self, task: asyncio.Task[int], hashes: tuple[int, ...]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        if task.result() == len(hashes):
            self.events.emit(EventKind.STORED, Medium.TIER, hashes)

    async def flush(self, request_id: str, timeout: float | None = None) -> int:
        """Wait for the request's background writes; returns how many of its blocks were written.

        A write that was dropped (in-flight bound, tier down) or not finished within ``timeout``
        counts as not written; the unfinished ones keep running in the background.
        """
        entries = self._pending.pop(request_id, [])
        tasks = [t for t, _ in entries if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        written = 0
        for task, _count in entries:
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                written += task.result()
        return written

    def forget(self, request_id: str) -> None:
        """Stop tracking a request's writes (they still complete); for cancelled requests."""
        self._pending.pop(request_id, None)

    async def close(self) -> None:
        if self.tier is not None:
            await self.tier.close()

"""Async client of the shared KV tier (Redis or Valkey).

The tier is a cache in the request path, so the client's one promise is that it never makes a
request slower than recomputing or wrong: every failure (server down, slow, restarted, evicted,
corrupt, another model's block) turns into a miss or a dropped write, is counted in a metric, and
never raises to the caller. A short circuit breaker keeps a dead server from costing every
request a connect timeout; the next call after the breaker's pause reconnects on its own.

Values are written as one buffer ``header | payload`` (``tusk.kvformat``). Writers that lay a
block out that way from the start (``new_value_buffer`` + ``seal_value``, as the worker's
snapshot does) add no copy: redis-py's asyncio packer hands the buffer to the transport as its
own chunk. Writers with a bare payload (``put_blocks``) pay one concatenation per block. The
alternative of ``SET header`` + ``APPEND payload`` was slower in ``bench/kvtier.py`` (a second
command and a server-side realloc) and leaves a window where a reader sees a header without its
payload. Reads are zero-copy from the reply: ``get_blocks`` returns memoryviews into the bytes
redis-py parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from tusk.kvformat import (
    DTYPE_SIZES,
    HEADER_FIXED_BYTES,
    BlockHeader,
    CorruptBlock,
    ModelFingerprint,
    block_key,
    decode_block,
    encode_header,
)
from tusk.kvtier import metrics
from tusk.kvtier.connect import connect

log = logging.getLogger(__name__)

BlockResult = tuple[BlockHeader, memoryview] | None
_THREAD_DECODE_BYTES = 8 << 20
_FAULTS = (RedisError, OSError, asyncio.TimeoutError, ConnectionError)


@dataclass(frozen=True)
class BlockData:
    """One block's payload described without torch: dtype name, shape and raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview


def header_size(ndim: int) -> int:
    return HEADER_FIXED_BYTES + 4 * ndim


def encode_value(block: BlockData) -> bytes:
    """``header | payload`` as one value (one copy of the payload)."""
    payload = memoryview(block.data).cast("B")
    return b"".join((encode_header(block.dtype, block.shape, payload), payload))


def new_value_buffer(dtype: str, shape: tuple[int, ...]) -> tuple[bytearray, memoryview]:
    """A value buffer with room for the header, and a view of its payload part to fill in place.

    Fill the payload (e.g. ``torch.frombuffer(payload_view, ...)`` as a copy target), then call
    ``seal_value`` to write the header; the whole buffer is then sent without another copy.
    """
    nbytes = DTYPE_SIZES[dtype]
    for dim in shape:
        nbytes *= dim
    hsize = header_size(len(shape))
    buf = bytearray(hsize + nbytes)
    return buf, memoryview(buf)[hsize:]


def seal_value(buf: bytearray, dtype: str, shape: tuple[int, ...]) -> memoryview:
    """Write the header of a buffer made by ``new_value_buffer``; returns the value to send."""
    hsize = header_size(len(shape))
    view = memoryview(buf)
    view[:hsize] = encode_header(dtype, shape, view[hsize:])
    return view


class KVTierClient:
    """Batched, pipelined block I/O against one tier URL for one model fingerprint.

    ``fingerprint`` may also be a fingerprint digest (the ``kv_fingerprint`` a worker reports in
    Health), which is all the router needs to ask ``contains``; reads then check the value's own
    header but cannot check its dtype against the model's.
    """

    def __init__(
        self,
        url: str,
        fingerprint: ModelFingerprint | str,
        *,
        timeout_s: float = 2.0,
        max_inflight_bytes: int = 256 << 20,
        block_shape: tuple[int, ...] | None = None,
        breaker_min_s: float = 0.05,
        breaker_max_s: float = 2.0,
        max_connections: int = 16,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.url = url
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self.max_inflight_bytes = max_inflight_bytes
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self._fp = fingerprint if isinstance(fingerprint, str) else fingerprint.digest()
        self._dtype = None if isinstance(fingerprint, str) else fingerprint.dtype
        self._breaker_min_s = breaker_min_s
        self._breaker_max_s = breaker_max_s
        self._backoff_s = 0.0
        self._unavailable_until = 0.0
        self._inflight_bytes = 0
        self._background: set[asyncio.Task] = set()
        # No client-side retries (see connect.py); the breaker paces reconnect attempts instead.
        self._redis = connect(url, timeout_s=timeout_s, max_connections=max_connections)

    @classmethod
    def from_config(cls, config, fingerprint: ModelFingerprint | str, **kwargs) -> KVTierClient:
        """Build from a ``tusk.config.KVTierConfig`` (its ``url`` must be set)."""
        if not config.url:
            raise ValueError("KV tier URL is not configured")
        return cls(
            config.url,
            fingerprint,
            timeout_s=config.timeout_s,
            max_inflight_bytes=config.max_inflight_bytes,
            **kwargs,
        )

    # -- keys and health -------------------------------------------------------------------

    def key(self, block_hash: int) -> str:
        return block_key(self._fp, block_hash)

    @property
    def available(self) -> bool:
        """False while the breaker is open after a failure (calls are misses without I/O)."""
        return time.monotonic() >= self._unavailable_until

    @property
    def inflight_bytes(self) -> int:
        return self._inflight_bytes

    def _fail(self, op: str, exc: BaseException) -> None:
        metrics.TIER_ERRORS.labels(op).inc()
        self._backoff_s = min(self._breaker_max_s, max(self._breaker_min_s, self._backoff_s * 2))
        self._unavailable_until = time.monotonic() + self._backoff_s
        log.warning("KV tier %s failed (%s: %s); pausing %.2fs", op, type(exc).__name__, exc, self._backoff_s)

    def _ok(self) -> None:
        self._backoff_s = 0.0

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._redis.ping()
        except _FAULTS as exc:
            self._fail("ping", exc)
            return False
        self._ok()
        self._unavailable_until = 0.0
        return True

    async def _execute(self, op: str, pipe) -> list | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await pipe.execute(raise_on_error=False)  # resets the pipeline itself
        except _FAULTS as exc:
            self._fail(op, exc)
            with contextlib.suppress(Exception):
                await pipe.reset()  # a timeout may have cut in before execute's own cleanup
            return None
        metrics.OP_SECONDS.labels(op).observe(time.perf_counter() - started)
        self._ok()
        return results

    # -- reads -----------------------------------------------------------------------------

    async def get_blocks(self, hashes: Sequence[int]) -> list[BlockResult]:
        """One pipelined round trip; per hash ``(header, payload view)`` or None (any miss)."""
        if not hashes:
            return []
        if not self.available:
            metrics.TIER_MISSES.labels("unavailable").inc(len(hashes))
            return [None] * len(hashes)
        pipe = self._redis.pipeline(transaction=False)
        for h in hashes:
            pipe.get(self.key(h))
        results = await self._execute("get", pipe)
        if results is None:
            metrics.TIER_MISSES.labels("error").inc(len(hashes))
            return [None] * len(hashes)
        if sum(len(v) for v in results if isinstance(v, bytes)) >= _THREAD_DECODE_BYTES:
            # Checksumming megabytes takes milliseconds and drops the GIL, so do it off the
            # loop, which keeps reading other requests' replies meanwhile.
            return await asyncio.to_thread(self._decode_all, hashes, results)
        return self._decode_all(hashes, results)

    def _decode_all(self, hashes: Sequence[int], results: list) -> list[BlockResult]:
        decoded = [self._decode(h, value) for h, value in zip(hashes, results, strict=True)]
        # Hits and bytes are counted once per batch: per-block counter updates cost as much as
        # the checksum of a small block.
        hits = [d for d in decoded if d is not None]
        if hits:
            metrics.TIER_HITS.inc(len(hits))
        received = sum(len(v) for v in results if isinstance(v, bytes))
        if received:
            metrics.GET_BYTES.inc(received)
        absent = sum(1 for v in results if v is None)
        if absent:
            metrics.TIER_MISSES.labels("absent").inc(absent)
        return decoded

    def _decode(self, block_hash: int, value) -> BlockResult:
        """One reply as a hit or None; misses other than absent keys are counted here."""
        if value is None:
            return None
        if not isinstance(value, bytes):  # a server error for this command, e.g. WRONGTYPE
            metrics.TIER_MISSES.labels("error").inc()
            return None
        try:
            header, payload = decode_block(value)
        except CorruptBlock as exc:
            metrics.CORRUPT_BLOCKS.inc()
            metrics.TIER_MISSES.labels("corrupt").inc()
            log.warning("corrupt KV block %s: %s", self.key(block_hash), exc)
            return None
        if (self._dtype is not None and header.dtype != self._dtype) or (
            self.block_shape is not None and header.shape != self.block_shape
        ):
            metrics.TIER_MISSES.labels("mismatch").inc()
            log.warning(
                "KV block %s is %s%s, expected %s%s",
                self.key(block_hash),
                header.dtype,
                header.shape,
                self._dtype,
                self.block_shape,
            )
            return None
        return header, payload

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        """Which hashes the tier holds, in one round trip (False for all if it is down)."""
        if not hashes:
            return []
        if not self.available:
            return [False] * len(hashes)
        pipe = self._redis.pipeline(transaction=False)
        for h in hashes:
            pipe.exists(self.key(h))
        results = await self._execute("contains", pipe)
        if results is None:
            return [False] * len(hashes)
        return [r == 1 for r in results]

    # -- writes ----------------------------------------------------------------------------

    async def put_values(self, hashes: Sequence[int], values: Sequence[bytes | memoryview]) -> int:
        """Write encoded values (``header | payload``) in one pipeline; returns blocks written."""
        if len(hashes) != len(values):
            raise ValueError(f"{len(hashes)} hashes but {len(values)} values")
        if not hashes:
            return 0
        if not self.available:
            metrics.DROPPED_WRITES.labels("unavailable").inc(len(hashes))
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for h, value in zip(hashes, values, strict=True):
            pipe.set(self.key(h), value if isinstance(value, bytes | memoryview) else memoryview(value))
        results = await self._execute("put", pipe)
        if results is None:
            metrics.DROPPED_WRITES.labels("error").inc(len(hashes))
            return 0
        written = sum(1 for r in results if r is True)
        nbytes = sum(len(v) for v, r in zip(values, results, strict=True) if r is True)
        metrics.PUT_BLOCKS.inc(written)
        metrics.PUT_BYTES.inc(nbytes)
        if written != len(hashes):
            metrics.DROPPED_WRITES.labels("error").inc(len(hashes) - written)
        return written

    async def put_blocks(self, hashes: Sequence[int], blocks: Sequence[BlockData]) -> int:
        """Encode and write blocks given as payloads (one concatenation per block)."""
        return await self.put_values(hashes, [encode_value(b) for b in blocks])

    def write_behind(
        self, hashes: Sequence[int], values: Sequence[bytes | memoryview]
    ) -> asyncio.Task[int] | None:
        """Start a background write; None if it would exceed ``max_inflight_bytes`` (dropped).

        Must be called on the client's event loop. The task's result is blocks written; the
        caller may await it (per-request flush) or let it run.
        """
        nbytes = sum(len(v) for v in values)
        if self._inflight_bytes + nbytes > self.max_inflight_bytes:
            metrics.DROPPED_WRITES.labels("inflight_full").inc(len(hashes))
            return None
        self._inflight_bytes += nbytes
        metrics.INFLIGHT_BYTES.inc(nbytes)
        task = asyncio.get_running_loop().create_task(self._write_and_release(hashes, values, nbytes))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _write_and_release(self, hashes, values, nbytes: int) -> int:
        try:
            return await self.put_values(hashes, values)
        finally:
            self._inflight_bytes -= nbytes
            metrics.INFLIGHT_BYTES.dec(nbytes)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for every background write (used on shutdown)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    async def close(self) -> None:
        await self.drain(self.timeout_s)
        for task in list(self._background):
            task.cancel()
        await self._redis.aclose()

    async def __aenter__(self) -> KVTierClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = [
    "BlockData",
    "BlockResult",
    "KVTierClient",
    "encode_value",
    "header_size",
    "new_value_buffer",
    "seal_value",
]

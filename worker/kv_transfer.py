"""Bridge between the engine's paged KV cache tensor and the shared KV tier (host LRU + Redis).

The engine (worker/engine.py) is synchronous and runs on its own thread; this class is asyncio
and lives on one event loop, where the Redis client's connections live. ``worker/connector.py``'s
``TierConnector`` adapts the two with concurrent futures. The contract:

* Construct on the loop it will serve from: ``KVTransfer.from_config(kv_tier_config, kv_cache,
  model_id)`` (None if the config enables neither a host cache nor a tier). ``fingerprint`` is
  the ``ModelFingerprint`` of the cache (``kv_fingerprint``); report its digest in Health.
* ``await load_prefix(hashes, block_ids) -> int`` (on the loop): fill the reserved blocks with
  the blocks ``hashes`` in order, from the host cache, then Redis in pipelined chunks, stopping
  at the first miss. Chunk i+1 is on the wire while chunk i is copied into the cache (on a worker
  thread, so the loop keeps reading). Returns how many *leading* blocks were filled; any tier
  fault only lowers it, never raises, and costs at most about ``KVTierConfig.timeout_s`` per chunk.
* ``save_blocks(request_id, hashes, block_ids, release=None)`` (any thread, e.g. the engine's):
  copies the blocks straight into value buffers laid out ``header | payload`` so the tier write
  needs no further copy; the checksum, the host-cache insert and the background tier write then
  run on the loop. Without ``release`` the copy happens *before returning* (the caller may reuse
  the ids right after). With ``release`` the copy too runs off the caller's thread (the engine's
  step thread does no copying): the caller keeps the blocks unchanged until ``release()`` is
  called, exactly once, from a worker thread, whether the copy worked, failed or was skipped.
* ``await flush(request_id, timeout) -> int``: blocks of the request durable in the tier. A
  prefill worker awaits it before answering Prefill (and reports it as ``blocks_in_tier``), which
  is what lets the decode worker rely on finding the prompt's blocks. ``forget(request_id)`` for
  requests nobody will flush (their writes still complete); a save that arrives after ``forget``
  is not tracked either.
* ``subscribe(listener)``: ``tusk.kvtier.events.KVEvent`` for host-cache and tier changes (call
  ``start_tier_watch`` to include the tier's own evictions); ``events.to_proto`` makes the
  ``KvEvent`` message. ``await close()`` on shutdown.

Copies use ``tusk.kernels.gather_kv_blocks`` / ``scatter_kv_blocks`` when the kernels package
exports them, plain torch indexing otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from tusk.kvformat import ModelFingerprint
from tusk.kvtier import metrics
from tusk.kvtier.client import KVTierClient, header_size, new_value_buffer, seal_value
from tusk.kvtier.events import EventListener
from tusk.kvtier.host_cache import CachedBlock, HostBlockCache
from tusk.kvtier.store import TieredBlockStore
from tusk.kvtier.watch import TierEvictionWatcher

log = logging.getLogger(__name__)

_FORGOTTEN_MAX = 4096
_MAX_TRACKED_REQUESTS = 4096
_MAX_CHUNK_BLOCKS = 64
LAYOUT = "L2NTHD"  # the engine's cache layout; one block is [layers, K/V, tokens, kv heads, dim]

_TORCH_TO_NAME = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
}


def _gather_fallback(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return kv_cache.index_select(2, block_ids).permute(2, 0, 1, 3, 4, 5).contiguous()


def _scatter_fallback(blocks: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    kv_cache.index_copy_(2, block_ids, blocks.permute(1, 2, 0, 3, 4, 5).to(kv_cache.dtype))


def _kernels() -> tuple[Callable, Callable]:
    try:
        from tusk.kernels import gather_kv_blocks, scatter_kv_blocks
    except ImportError:
        return _gather_fallback, _scatter_fallback
    return gather_kv_blocks, scatter_kv_blocks


def kv_fingerprint(model_id: str, kv_cache: torch.Tensor) -> ModelFingerprint:
    """The fingerprint of blocks of ``kv_cache`` (same fields as the engine's own fingerprint)."""
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [L, 2, N, block_size, Hkv, D], got {tuple(kv_cache.shape)}")
    if kv_cache.dtype not in _TORCH_TO_NAME:
        raise ValueError(f"unsupported KV cache dtype {kv_cache.dtype}")
    layers, _, _, block_size, kv_heads, head_dim = kv_cache.shape
    return ModelFingerprint(
        model=model_id,
        dtype=_TORCH_TO_NAME[kv_cache.dtype],
        layout=LAYOUT,
        block_size=int(block_size),
        num_layers=int(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
    )


class KVTransfer:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        store: TieredBlockStore,
        fingerprint: ModelFingerprint,
        *,
        chunk_blocks: int | None = None,
        chunk_bytes: int = 8 << 20,
        max_snapshot_bytes: int = 256 << 20,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Binds to ``loop`` or, by default, the running loop (construct it there)."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(f"kv_cache must be [L, 2, N, block_size, Hkv, D], got {tuple(kv_cache.shape)}")
        if chunk_blocks is not None and chunk_blocks <= 0:
            raise ValueError(f"chunk_blocks must be positive, got {chunk_blocks}")
        self.kv_cache = kv_cache
        self.store = store
        self.fingerprint = fingerprint
        self.max_snapshot_bytes = max_snapshot_bytes
        self.block_shape = (int(kv_cache.shape[0]), 2, *(int(d) for d in kv_cache.shape[3:]))
        self.dtype_name = _TORCH_TO_NAME[kv_cache.dtype]
        self._value_nbytes = header_size(len(self.block_shape)) + kv_cache.element_size() * math.prod(
            self.block_shape
        )
        # One GET pipeline per chunk: big enough to amortise a round trip and a thread hop, small
        # enough that the next chunk's transfer overlaps this one's copy into the cache.
        self.chunk_blocks = chunk_blocks or max(1, min(_MAX_CHUNK_BLOCKS, chunk_bytes // self._value_nbytes))
        self._loop = loop or asyncio.get_running_loop()
        self._gather, self._scatter = _kernels()
        self._lock = threading.Lock()
        # Saves per request until flushed or forgotten; bounded so that requests whose caller went
        # away between finishing and flushing cannot grow it forever (oldest dropped first).
        self._requests: OrderedDict[str, list[concurrent.futures.Future[int]]] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._saving: set[concurrent.futures.Future[int]] = set()
        self._snapshot_bytes = 0
        self._watcher: TierEvictionWatcher | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config,
        kv_cache: torch.Tensor,
        model_id: str | ModelFingerprint,
        *,
        host_cache_bytes: int | None = None,
        **kwargs,
    ) -> KVTransfer | None:
        """Build from a ``KVTierConfig``; None if it enables neither a host cache nor a tier."""
        fingerprint = (
            model_id if isinstance(model_id, ModelFingerprint) else kv_fingerprint(model_id, kv_cache)
        )
        block_shape = (int(kv_cache.shape[0]), 2, *(int(d) for d in kv_cache.shape[3:]))
        tier = KVTierClient.from_config(config, fingerprint, block_shape=block_shape) if config.url else None
        host = (
            HostBlockCache(config.host_cache_blocks, host_cache_bytes) if config.host_cache_blocks else None
        )
        if tier is None and host is None:
            return None
        store = TieredBlockStore(host, tier, write_through=config.write_through)
        kwargs.setdefault("max_snapshot_bytes", config.max_inflight_bytes)
        return cls(kv_cache, store, fingerprint, **kwargs)

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(KVEvent)`` on every host-cache and tier change; returns unsubscribe."""
        return self.store.events.subscribe(listener)

    async def start_tier_watch(self) -> bool:
        """Also report the tier's own evictions; False if the server does not allow it."""
        if self.store.tier is None or self._watcher is not None:
            return False
        self._watcher = TierEvictionWatcher(self.store.tier.url, self.fingerprint, self.store.events)
        return await self._watcher.start()

    # -- loading ---------------------------------------------------------------------------

    async def load_prefix(self, hashes: Sequence[int], block_ids: Sequence[int]) -> int:
        """Fill ``block_ids`` with the blocks ``hashes`` in order; returns how many leading ones."""
        n = min(len(hashes), len(block_ids))
        if n == 0 or self._closed:
            return 0
        loaded = 0
        stream = self.store.fetch_prefix(list(hashes[:n]), self.chunk_blocks)
        try:
            async for chunk in stream:
                ids = list(block_ids[loaded : loaded + len(chunk)])
                await asyncio.to_thread(self._copy_in, chunk, ids)
                loaded += len(chunk)
        except Exception:  # noqa: BLE001 - whatever went wrong, the blocks loaded so far are good
            log.exception("KV tier load stopped after %d blocks", loaded)
        finally:
            await stream.aclose()
        return loaded

    def _copy_in(self, chunk: list[CachedBlock], block_ids: list[int]) -> None:
        dtype = self.kv_cache.dtype
        with warnings.catch_warnings():
            # Reply bytes are read-only; they are only read here (copied into the cache below).
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = [torch.frombuffer(b.payload, dtype=dtype).view(self.block_shape) for b in chunk]
        blocks = torch.stack(tensors).to(self.kv_cache.device)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        self._scatter(blocks, self.kv_cache, ids)

    # -- saving ----------------------------------------------------------------------------

    def save_blocks(
        self,
        request_id: str,
        hashes: Sequence[int],
        block_ids: Sequence[int],
        release: Callable[[], None] | None = None,
    ) -> bool:
        """Snapshot blocks (now, or in the background until ``release()``), then cache and write
        them through in the background.

        Returns False if nothing was saved: closed, or ``max_snapshot_bytes`` already queued
        (counted in ``tusk_kvtier_dropped_writes_total{reason="inflight_full"}``); ``release``
        has then already been called.
        """
        if len(hashes) != len(block_ids):
            if release is not None:
                release()
            raise ValueError(f"{len(hashes)} hashes but {len(block_ids)} block ids")
        nbytes = len(hashes) * self._value_nbytes
        with self._lock:
            refused = self._closed or not hashes or self._snapshot_bytes + nbytes > self.max_snapshot_bytes
            if not refused:
                self._snapshot_bytes += nbytes
        if refused:
            if hashes and not self._closed:
                metrics.DROPPED_WRITES.labels("inflight_full").inc(len(hashes))
            if release is not None:
                release()
            return False
        if release is None:
            try:
                buffers: list[bytearray] | None = self._copy_out(block_ids)
            except BaseException:
                with self._lock:
                    self._snapshot_bytes -= nbytes
                raise
            ids = None
        else:
            buffers, ids = None, list(block_ids)
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._seal_and_store(list(hashes), buffers, nbytes, ids, release), self._loop
            )
        except BaseException:  # e.g. the loop is closed: nothing will copy, so give the blocks back
            with self._lock:
                self._snapshot_bytes -= nbytes
            if ids is not None and release is not None:
                release()
            raise
        with self._lock:
            self._saving.add(future)
            if request_id not in self._forgotten:
                self._requests.setdefault(request_id, []).append(future)
                while len(self._requests) > _MAX_TRACKED_REQUESTS:
                    self._requests.popitem(last=False)
        future.add_done_callback(self._saved)
        return True

    def _saved(self, future: concurrent.futures.Future[int]) -> None:
        with self._lock:
            self._saving.discard(future)

    def _copy_out(self, block_ids: Sequence[int]) -> list[bytearray]:
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.kv_cache.device)
        gathered = self._gather(self.kv_cache, ids)
        buffers = []
        for i in range(len(block_ids)):
            buf, payload = new_value_buffer(self.dtype_name, self.block_shape)
            torch.frombuffer(payload, dtype=self.kv_cache.dtype).view(self.block_shape).copy_(gathered[i])
            buffers.append(buf)
        return buffers

    def _copy_and_seal(
        self,
        buffers: list[bytearray] | None,
        block_ids: list[int] | None,
        release: Callable[[], None] | None,
    ) -> list[bytearray]:
        """(On a worker thread) the pending snapshot copy, if any, then the checksums."""
        if buffers is None:
            try:
                buffers = self._copy_out(block_ids or [])
            finally:
                if release is not None:
                    release()
        # zlib drops the GIL: the checksums overlap the engine's step.
        return [seal_value(b, self.dtype_name, self.block_shape) for b in buffers]

    async def _seal_and_store(
        self,
        hashes: list[int],
        buffers: list[bytearray] | None,
        nbytes: int,
        block_ids: list[int] | None = None,
        release: Callable[[], None] | None = None,
    ) -> int:
        """Copy (if still pending), checksum, cache and write one snapshot; returns how many blocks
        reached the tier."""
        try:
            values = await asyncio.to_thread(self._copy_and_seal, buffers, block_ids, release)
            write = self.store.store(None, hashes, values)
        except Exception:  # noqa: BLE001 - a lost write is only a future miss
            log.exception("KV tier write of %d blocks failed", len(hashes))
            return 0
        finally:
            with self._lock:
                self._snapshot_bytes -= nbytes
        return await write if write is not None else 0

    async def flush(self, request_id: str, timeout: float | None = None) -> int:
        """Wait until the request's saved blocks are in the tier; returns how many are.

        Writes still running at the timeout keep going in the background but are not counted.
        """
        with self._lock:
            futures = self._requests.pop(request_id, [])
        if not futures:
            return 0
        waiting = [asyncio.wrap_future(f) for f in futures]
        await asyncio.wait(waiting, timeout=timeout)
        return sum(f.result() for f in waiting if f.done() and not f.cancelled() and f.exception() is None)

    def forget(self, request_id: str) -> None:
        """Stop tracking a request's saves, present and future (they still complete)."""
        with self._lock:
            self._requests.pop(request_id, None)
            self._forgotten[request_id] = None
            while len(self._forgotten) > _FORGOTTEN_MAX:
                self._forgotten.popitem(last=False)

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        return await self.store.contains(hashes)

    async def close(self) -> None:
        """Let queued writes finish (bounded by the tier timeout), then close the client."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            saving = [asyncio.wrap_future(f) for f in self._saving]
        if saving:
            await asyncio.wait(saving, timeout=self.store.tier.timeout_s if self.store.tier else 5.0)
        if self._watcher is not None:
            await self._watcher.stop()
        await self.store.close()


__all__ = ["LAYOUT", "KVTransfer", "kv_fingerprint"]

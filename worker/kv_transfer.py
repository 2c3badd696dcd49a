"""Bridge between the engine's paged KV cache tensor and the shared KV tier (host LRU + Redis).

Contract with the engine (worker/engine.py)
-------------------------------------------
The engine owns one tensor ``kv_cache[L, 2, N, block_size, Hkv, D]`` and a block manager that
maps block hashes (``tusk.hashing.block_hashes``) to block ids. It uses this module as follows:

* Build once, on the worker's event loop, after allocating the cache::

      transfer = KVTransfer.from_config(worker_config.kv_tier, kv_cache, model_id=model_digest(folder))
      # None when the config asks for neither a host cache nor a tier

  ``transfer.fingerprint`` is the ``ModelFingerprint`` of this cache (report its ``digest()``
  in Health.kv_fingerprint).

* Before computing a prompt, for the blocks past the device-cache hit, allocate block ids and
  ``loaded = await transfer.load_prefix(hashes[hit:], new_block_ids)``. The first ``loaded``
  blocks now hold their KV (register their hashes in the block manager); compute the rest.
  Blocks come from the host cache, then Redis in pipelined chunks, stopping at the first miss;
  chunk i+1 is on the wire while chunk i is copied into the cache on a worker thread.
  Any tier fault just lowers ``loaded`` (down to 0): never an exception, never a hang beyond
  ``KVTierConfig.timeout_s`` per chunk.

* After a step fills full blocks, ``transfer.save_blocks(request_id, hashes, block_ids)``.
  It copies the blocks out *now* (so the ids may be reused right after it returns) and writes
  them to the host cache and, in the background, to the tier. Callable from the engine thread or
  the event loop. A prefill worker then does ``n = await transfer.flush(request_id, timeout)``
  before answering Prefill, and reports ``n`` as ``blocks_in_tier``: the decode worker can rely on
  those blocks being in the tier. Cancelled requests call ``transfer.forget(request_id)``.

* KV events (host cache stored/evicted, tier stored/evicted/cleared) go to listeners added with
  ``transfer.subscribe(callback)``; ``tusk.kvtier.events.to_proto`` converts one to a
  ``KvEvent`` for StreamKvEvents. Call ``await transfer.start_tier_watch()`` to also learn of
  blocks the tier evicted (keyspace notifications).

* ``await transfer.close()`` on shutdown.

The copies use ``tusk.kernels.gather_kv_blocks`` / ``scatter_kv_blocks`` when the kernels
package exports them, plain torch indexing otherwise (same result).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from tusk.kvformat import ModelFingerprint
from tusk.kvtier import metrics
from tusk.kvtier.client import KVTierClient, new_value_buffer, seal_value
from tusk.kvtier.events import EventListener
from tusk.kvtier.host_cache import CachedBlock, HostBlockCache
from tusk.kvtier.store import TieredBlockStore
from tusk.kvtier.watch import TierEvictionWatcher

LAYOUT = "L2THD"  # one block = [layers, K/V, tokens, kv heads, head dim], contiguous

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
    """The fingerprint of blocks taken from ``kv_cache`` of the model ``model_id``."""
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
        chunk_blocks: int = 8,
        max_snapshot_bytes: int = 256 << 20,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.store = store
        self.fingerprint = fingerprint
        self.chunk_blocks = chunk_blocks
        self.max_snapshot_bytes = max_snapshot_bytes
        self.block_shape = (kv_cache.shape[0], 2, *kv_cache.shape[3:])
        self.dtype_name = _TORCH_TO_NAME[kv_cache.dtype]
        self._loop = loop or asyncio.get_running_loop()
        self._gather, self._scatter = _kernels()
        self._lock = threading.Lock()
        self._snapshots: dict[str, list[concurrent.futures.Future]] = defaultdict(list)
        self._snapshot_bytes = 0
        self._watcher: TierEvictionWatcher | None = None

    @classmethod
    def from_config(
        cls,
        config,
        kv_cache: torch.Tensor,
        model_id: str,
        *,
        host_cache_bytes: int | None = None,
        **kwargs,
    ) -> KVTransfer | None:
        """Build from a ``KVTierConfig``; None if it enables neither host cache nor tier.

        Must run on the event loop the worker serves from.
        """
        fingerprint = kv_fingerprint(model_id, kv_cache)
        block_shape = (kv_cache.shape[0], 2, *kv_cache.shape[3:])
        tier = KVTierClient.from_config(config, fingerprint, block_shape=block_shape) if config.url else None
        host = (
            HostBlockCache(config.host_cache_blocks, host_cache_bytes) if config.host_cache_blocks else None
        )
        if tier is None and host is None:
            return None
        store = TieredBlockStore(host, tier, write_through=config.write_through)
        return cls(kv_cache, store, fingerprint, max_snapshot_bytes=config.max_inflight_bytes, **kwargs)

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        return self.store.events.subscribe(listener)

    async def start_tier_watch(self) -> bool:
        """Start forwarding tier evictions as events; False if the server does not allow it."""
        if self.store.tier is None or self._watcher is not None:
            return False
        self._watcher = TierEvictionWatcher(self.store.tier.url, self.fingerprint, self.store.events)
        return await self._watcher.start()

    # -- loading ---------------------------------------------------------------------------

    async def load_prefix(self, hashes: Sequence[int], block_ids: Sequence[int]) -> int:
        """Fill ``block_ids`` with the blocks ``hashes`` in order; returns how many leading ones."""
        n = min(len(hashes), len(block_ids))
        loaded = 0
        if n == 0:
            return 0
        stream = self.store.fetch_prefix(list(hashes[:n]), self.chunk_blocks)
        try:
            async for chunk in stream:
                ids = list(block_ids[loaded : loaded + len(chunk)])
                await asyncio.to_thread(self._copy_in, chunk, ids)
                loaded += len(chunk)
        finally:
            await stream.aclose()
        return loaded

    def _copy_in(self, chunk: list[CachedBlock], block_ids: list[int]) -> None:
        dtype = self.kv_cache.dtype
        with warnings.catch_warnings():
            # Reply bytes are read-only; we only read them (copied into the cache below).
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = [torch.frombuffer(b.payload, dtype=dtype).view(self.block_shape) for b in chunk]
        blocks = torch.stack(tensors).to(self.kv_cache.device, non_blocking=True)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.kv_cache.device)
        self._scatter(blocks, self.kv_cache, ids)

    # -- saving ----------------------------------------------------------------------------

    def save_blocks(self, request_id: str, hashes: Sequence[int], block_ids: Sequence[int]) -> bool:
        """Snapshot full blocks now and store them (host cache + background tier write).

        Returns False if the snapshot was skipped because too many bytes are still queued.
        Safe to call from the engine thread or the event loop.
        """
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes but {len(block_ids)} block ids")
        if not hashes:
            return True
        nbytes = len(hashes) * self._block_nbytes()
        with self._lock:
            if self._snapshot_bytes + nbytes > self.max_snapshot_bytes:
                metrics.DROPPED_WRITES.labels("inflight_full").inc(len(hashes))
                return False
            self._snapshot_bytes += nbytes
        try:
            buffers = self._copy_out(block_ids)
        except BaseException:
            with self._lock:
                self._snapshot_bytes -= nbytes
            raise
        future = asyncio.run_coroutine_threadsafe(
            self._seal_and_store(request_id, list(hashes), buffers, nbytes), self._loop
        )
        with self._lock:
            self._snapshots[request_id].append(future)
        return True

    def _block_nbytes(self) -> int:
        n = self.kv_cache.element_size()
        for dim in self.block_shape:
            n *= dim
        return n

    def _copy_out(self, block_ids: Sequence[int]) -> list[bytearray]:
        ids = torch.tensor(list(block_ids), dtype=torch.long, device=self.kv_cache.device)
        gathered = self._gather(self.kv_cache, ids)
        buffers = []
        for i in range(len(block_ids)):
            buf, payload = new_value_buffer(self.dtype_name, self.block_shape)
            target = torch.frombuffer(payload, dtype=self.kv_cache.dtype).view(self.block_shape)
            target.copy_(gathered[i])
            buffers.append(buf)
        return buffers

    async def _seal_and_store(
        self, request_id: str, hashes: list[int], buffers: list[bytearray], nbytes: int
    ) -> int:
        """Checksum, cache and write one snapshot; returns how many blocks reached the tier."""
        try:
            # The checksum pass is the only CPU work on the write path; zlib drops the GIL.
            values = await asyncio.to_thread(
                lambda: [seal_value(b, self.dtype_name, self.block_shape) for b in buffers]
            )
            write = self.store.store(None, hashes, values)
        finally:
            with self._lock:
                self._snapshot_bytes -= nbytes
        return await write if write is not None else 0

    async def flush(self, request_id: str, timeout: float | None = None) -> int:
        """Wait until the request's saved blocks are in the tier; returns how many are.

        Writes still running at the timeout keep going in the background but are not counted.
        """
        with self._lock:
            futures = self._snapshots.pop(request_id, [])
        if not futures:
            return 0
        waiting = [asyncio.wrap_future(f) for f in futures]
        await asyncio.wait(waiting, timeout=timeout)
        written = 0
        for fut in waiting:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                written += fut.result()
        return written

    def forget(self, request_id: str) -> None:
        """Stop tracking a request's saves (they still complete); for cancelled requests."""
        with self._lock:
            self._snapshots.pop(request_id, None)

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        return await self.store.contains(hashes)

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        await self.store.close()


__all__ = ["LAYOUT", "KVTransfer", "kv_fingerprint"]

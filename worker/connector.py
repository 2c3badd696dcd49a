"""The engine's view of the KV tier (host LRU cache + Redis), and its adapter to ``KVTransfer``.

The engine is synchronous and runs on its own thread; ``tusk.worker.kv_transfer.KVTransfer`` is
asyncio and lives on an event loop (the gRPC server's, or a private background loop when the
engine is used in-process). ``TierConnector`` bridges the two with concurrent futures, so tier
I/O runs beside the step loop instead of inside it:

* ``load``: fill the given reserved blocks with the tier's copies, in order; the future's result
  is how many *leading* blocks were filled. A miss, timeout, corrupt value or dead tier stops the
  prefix there and the engine recomputes the rest. The engine does not hand the blocks to anyone
  else until the future is done, so the transfer may write into them until then.
* ``save``: snapshot the blocks, then write them in the background. Without ``release`` the
  snapshot is taken *before returning* (the engine may reuse the blocks right after). Connectors
  with ``copies_in_background = True`` also accept ``release``: the snapshot copy then runs off
  the engine's step thread, and the engine keeps the blocks unchanged until ``release()``.
* ``finish``: the request is over; ``keep`` = its writes will be awaited with ``flush`` (Prefill).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from tusk.config import KVTierConfig

log = logging.getLogger("tusk.worker.connector")
T = TypeVar("T")


@runtime_checkable
class KvConnector(Protocol):
    def load(self, block_hashes: list[int], block_ids: list[int]) -> concurrent.futures.Future[int]: ...

    def save(self, request_id: str, block_hashes: list[int], block_ids: list[int]) -> None: ...

    # Optional: ``copies_in_background = True`` and save(..., release=callback), see above.

    def finish(self, request_id: str, keep: bool) -> None: ...

    def close(self) -> None: ...


class BackgroundLoop:
    """An event loop on a daemon thread, for using the tier from a synchronous engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tusk-kv-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class TierConnector:
    """``KvConnector`` over a ``KVTransfer`` living on ``loop``."""

    def __init__(self, transfer: Any, loop: asyncio.AbstractEventLoop, owned: BackgroundLoop | None = None):
        self.transfer = transfer
        self.loop = loop
        self._owned = owned

    @classmethod
    def create(
        cls,
        config: KVTierConfig,
        kv_cache: torch.Tensor,
        model_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> TierConnector | None:
        """Build the transfer on ``loop`` (a private background loop if None); None if the config
        enables neither a host cache nor a tier. Must not be called from ``loop``'s own thread."""
        from tusk.worker.kv_transfer import KVTransfer

        owned = BackgroundLoop() if loop is None else None
        loop = owned.loop if owned else loop
        assert loop is not None

        async def build() -> Any:
            return KVTransfer.from_config(config, kv_cache, model_id)

        transfer = asyncio.run_coroutine_threadsafe(build(), loop).result(timeout=30)
        if transfer is None:
            if owned:
                owned.stop()
            return None
        return cls(transfer, loop, owned)

    @classmethod
    async def create_async(
        cls, config: KVTierConfig, kv_cache: torch.Tensor, model_id: str
    ) -> TierConnector | None:
        """Build on the running loop (the gRPC server's)."""
        from tusk.worker.kv_transfer import KVTransfer

        transfer = KVTransfer.from_config(config, kv_cache, model_id)
        return None if transfer is None else cls(transfer, asyncio.get_running_loop())

    def _submit(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop)

    def load(self, block_hashes: list[int], block_ids: list[int]) -> concurrent.futures.Future[int]:
        return self._submit(lambda: self.transfer.load_prefix(block_hashes, block_ids))

    copies_in_background = True

    def save(
        self,
        request_id: str,
        block_hashes: list[int],
        block_ids: list[int],
        release: Callable[[], None] | None = None,
    ) -> None:
        try:
            self.transfer.save_blocks(request_id, block_hashes, block_ids, release)
        except Exception:  # noqa: BLE001 - a failed write-through only costs a future miss
            log.exception("KV write-through failed")

    def finish(self, request_id: str, keep: bool) -> None:
        if not keep:
            self.transfer.forget(request_id)

    def flush(self, request_id: str, timeout: float) -> concurrent.futures.Future[int]:
        """Blocks of ``request_id`` durable in the tier, once its writes finish (or ``timeout``)."""
        return self._submit(lambda: self.transfer.flush(request_id, timeout))

    @property
    def fingerprint(self) -> Any:
        return self.transfer.fingerprint

    def subscribe(self, listener: Callable[[Any], None]) -> Callable[[], None]:
        return self.transfer.subscribe(listener)

    def close(self) -> None:
        """Close from any thread but the loop's own (there, await ``aclose``)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            future = self._submit(self.transfer.close)
            if running is not self.loop:
                future.result(timeout=5)
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.debug("closing the KV transfer failed", exc_info=True)
        if self._owned is not None:
            self._owned.stop()

    async def aclose(self) -> None:
        await self.transfer.close()

"""The engine's side of the KV tier bridge (implemented by ``tusk.worker.kv_transfer``).

The engine never talks to Redis itself. It hands a connector block ids of its KV cache tensor
together with the block hashes they hold (or should hold), and gets futures back, so tier I/O
runs beside the step loop instead of inside it:

* ``load``: fill the given (reserved, unreferenced by anyone else) blocks with the tier's copies,
  in order; the result is how many *leading* blocks were filled. A miss, timeout, corrupt value or
  dead tier stops the prefix there; the engine recomputes the rest. The engine does not reuse the
  blocks until the future is done, so the connector may write into them until then.
* ``save``: snapshot the blocks' contents *before returning* (the engine may reuse the blocks
  right after), then write them to the tier in the background; the result is how many were
  written.
* ``drain_events``: optional KV events of the host and tier media, as ``(stored, medium, hashes)``
  with medium ``"host"`` or ``"tier"``, merged into the worker's event stream.
"""

from __future__ import annotations

import concurrent.futures
from typing import Protocol, runtime_checkable


@runtime_checkable
class KvConnector(Protocol):
    def load(self, block_hashes: list[int], block_ids: list[int]) -> concurrent.futures.Future[int]: ...

    def save(self, block_hashes: list[int], block_ids: list[int]) -> concurrent.futures.Future[int]: ...

    def close(self) -> None: ...

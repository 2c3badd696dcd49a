"""KV events of the host cache and the tier, and the hook the worker's event stream subscribes to.

Events are plain dataclasses so that the cache and the tier client stay free of gRPC; the worker
server turns them into ``KvEvent`` messages with ``to_proto``. Listeners are called synchronously
on the thread that changed the cache and must not block (append to a queue and return).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)


class Medium(StrEnum):
    HOST = "host"
    TIER = "tier"


class EventKind(StrEnum):
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"  # every block of this medium is gone (restart, flush)


@dataclass(frozen=True)
class KVEvent:
    kind: EventKind
    medium: Medium
    block_hashes: tuple[int, ...] = ()


EventListener = Callable[[KVEvent], None]


class EventHub:
    """Fan-out of KV events to subscribers; a failing listener is logged, never propagated."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, kind: EventKind, medium: Medium, block_hashes: Iterable[int] = ()) -> None:
        hashes = tuple(block_hashes)
        if not hashes and kind is not EventKind.CLEARED:
            return
        event = KVEvent(kind, medium, hashes)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not break the cache
                log.exception("KV event listener failed")


def to_proto(event: KVEvent):
    """The ``tusk.v1.KvEvent`` message for an event (imports the generated protocol lazily)."""
    from tusk.protocol import pb

    kind = {
        EventKind.STORED: pb.KvEvent.KIND_STORED,
        EventKind.REMOVED: pb.KvEvent.KIND_REMOVED,
        EventKind.CLEARED: pb.KvEvent.KIND_CLEARED,
    }[event.kind]
    medium = {Medium.HOST: pb.KV_MEDIUM_HOST, Medium.TIER: pb.KV_MEDIUM_TIER}[event.medium]
    return pb.KvEvent(kind=kind, medium=medium, block_hashes=list(event.block_hashes))

"""Shared KV cache tier client (Redis/Valkey) and the worker-side host cache.

Layers, bottom up: ``client.KVTierClient`` (pipelined block I/O, faults become misses),
``host_cache.HostBlockCache`` (the worker's CPU LRU), ``store.TieredBlockStore`` (host then tier,
write-through with per-request flush), ``events`` (KV events for the router's index) and
``watch.TierEvictionWatcher`` (tier evictions as events). ``tusk.worker.kv_transfer`` binds them
to the engine's KV cache tensor.
"""

from tusk.kvtier.client import BlockData, KVTierClient, encode_value, new_value_buffer, seal_value
from tusk.kvtier.events import EventHub, EventKind, KVEvent, Medium
from tusk.kvtier.host_cache import CachedBlock, HostBlockCache
from tusk.kvtier.store import TieredBlockStore

__all__ = [
    "BlockData",
    "CachedBlock",
    "EventHub",
    "EventKind",
    "HostBlockCache",
    "KVEvent",
    "KVTierClient",
    "Medium",
    "TieredBlockStore",
    "encode_value",
    "new_value_buffer",
    "seal_value",
]

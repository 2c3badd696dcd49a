"""A worker that starts before its KV tier: the eviction watch waits for the tier instead of
giving up for good, and reports evictions once it is there."""

from __future__ import annotations

import asyncio
import socket
import time

from kvtier_helpers import TINY_BLOCK, random_block

from tusk.kvformat import encode_block
from tusk.kvtier.client import KVTierClient
from tusk.kvtier.events import EventHub, EventKind, KVEvent
from tusk.kvtier.watch import TierEvictionWatcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_eviction_watch_waits_for_a_tier_that_starts_late(fp) -> None:
    import redis
    import torch

    from tusk.kvserver import start_server

    port = _free_port()
    hub = EventHub()
    seen: list[KVEvent] = []
    hub.subscribe(seen.append)
    watcher = TierEvictionWatcher(
        f"redis://127.0.0.1:{port}/0", fp, hub, reconnect_s=0.05, max_reconnect_s=0.2
    )
    server = None
    try:
        assert await watcher.start()  # nothing listens yet: not a refusal
        await asyncio.sleep(0.3)  # a few failed tries
        server = start_server(port=port, maxmemory="2mb")
        deadline = time.monotonic() + 10
        while not watcher._subscribed.is_set():
            assert time.monotonic() < deadline, "the watch never reached the late tier"
            await asyncio.sleep(0.05)
        raw = redis.Redis.from_url(server.url)
        raw.config_set("maxmemory", "2mb")
        raw.close()
        block = encode_block(
            "float32", TINY_BLOCK, random_block(torch.float32, TINY_BLOCK, 1).numpy().tobytes()
        )
        async with KVTierClient(server.url, fp) as client:
            for start in range(0, 200, 20):
                await client.put_values(list(range(start, start + 20)), [block] * 20)
        while not any(e.kind is EventKind.REMOVED for e in seen):
            assert time.monotonic() < deadline, "no eviction reported"
            await asyncio.sleep(0.05)
    finally:
        await watcher.stop()
        if server is not None:
            server.stop()

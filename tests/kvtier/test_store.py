"""Host LRU cache, the tiered store, KV events and the tier eviction watcher."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import torch
from kvtier_helpers import TINY_BLOCK, fingerprint, random_block

from tusk.kvformat import decode_block, encode_block
from tusk.kvserver import server_args
from tusk.kvtier.client import KVTierClient
from tusk.kvtier.events import EventHub, EventKind, KVEvent, Medium, to_proto
from tusk.kvtier.host_cache import CachedBlock, HostBlockCache
from tusk.kvtier.store import TieredBlockStore
from tusk.kvtier.watch import TierEvictionWatcher
from tusk.protocol import pb


def value(seed: int, shape=TINY_BLOCK) -> bytes:
    return encode_block("float32", shape, random_block(torch.float32, shape, seed).numpy().tobytes())


def cached(seed: int) -> CachedBlock:
    raw = value(seed)
    header, payload = decode_block(raw)
    return CachedBlock(header, payload, raw)


def recorder(hub: EventHub) -> list[KVEvent]:
    seen: list[KVEvent] = []
    hub.subscribe(seen.append)
    return seen


def test_host_cache_lru_by_blocks_with_events():
    cache = HostBlockCache(max_blocks=2)
    seen = recorder(cache.events)
    cache.put(1, cached(1))
    cache.put(2, cached(2))
    assert cache.get(1) is not None  # 1 is now the most recent
    cache.put(3, cached(3))
    assert 2 not in cache and 1 in cache and 3 in cache
    assert seen == [
        KVEvent(EventKind.STORED, Medium.HOST, (1,)),
        KVEvent(EventKind.STORED, Medium.HOST, (2,)),
        KVEvent(EventKind.REMOVED, Medium.HOST, (2,)),
        KVEvent(EventKind.STORED, Medium.HOST, (3,)),
    ]
    cache.put(3, cached(3))  # a re-put is not a new stored event
    assert len(seen) == 4
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert seen[-1].kind is EventKind.CLEARED


def test_host_cache_bounded_by_bytes():
    size = len(value(0))
    cache = HostBlockCache(max_blocks=100, max_bytes=3 * size)
    for h in range(5):
        cache.put(h, cached(h))
    assert len(cache) == 3 and cache.nbytes == 3 * size
    assert [h for h in range(5) if h in cache] == [2, 3, 4]
    assert [b.header.checksum for b in cache.leading_hits([2, 3, 9, 4])] == [
        cached(2).header.checksum,
        cached(3).header.checksum,
    ]
    too_big = HostBlockCache(max_blocks=10, max_bytes=size - 1)
    too_big.put(1, cached(1))
    assert len(too_big) == 0
    with pytest.raises(ValueError):
        HostBlockCache(max_blocks=-1)


def test_a_failing_listener_does_not_break_the_cache():
    cache = HostBlockCache(max_blocks=1)

    def broken(event: KVEvent) -> None:
        raise RuntimeError("subscriber bug")

    cache.events.subscribe(broken)
    seen = recorder(cache.events)
    cache.put(1, cached(1))
    assert 1 in cache and len(seen) == 1


def test_events_convert_to_protocol_messages():
    msg = to_proto(KVEvent(EventKind.REMOVED, Medium.TIER, (5, 2**64 - 1)))
    assert msg.kind == pb.KvEvent.KIND_REMOVED and msg.medium == pb.KV_MEDIUM_TIER
    assert list(msg.block_hashes) == [5, 2**64 - 1]
    assert to_proto(KVEvent(EventKind.CLEARED, Medium.HOST)).kind == pb.KvEvent.KIND_CLEARED


async def test_store_reads_host_then_tier_and_stops_at_first_miss(kv_server, fp):
    async with KVTierClient(kv_server.url, fp) as client:
        await client.put_values([2, 3, 5], [value(2), value(3), value(5)])  # 4 is missing
        host = HostBlockCache(max_blocks=16)
        host.put(1, cached(1))
        store = TieredBlockStore(host, client)
        chunks = [chunk async for chunk in store.fetch_prefix([1, 2, 3, 4, 5], chunk_blocks=1)]
        got = [b.header.checksum for chunk in chunks for b in chunk]
        assert got == [cached(h).header.checksum for h in (1, 2, 3)]
        assert 2 in host and 3 in host and 5 not in host  # tier hits are cached on the host
        assert await store.contains([1, 2, 4, 5]) == [True, True, False, True]


async def test_store_write_through_flush_and_tier_events(kv_server, fp):
    async with KVTierClient(kv_server.url, fp) as client:
        store = TieredBlockStore(HostBlockCache(max_blocks=16), client)
        seen = recorder(store.events)
        store.store("r1", [1, 2], [value(1), value(2)])
        store.store("r1", [3], [value(3)])
        store.store("r2", [4], [value(4)])
        assert await store.flush("r1", timeout=5) == 3
        assert await store.flush("r1", timeout=5) == 0  # already flushed
        assert await client.contains([1, 2, 3]) == [True, True, True]
        store.forget("r2")
        await client.drain()
        tier_stored = {h for e in seen if e.medium is Medium.TIER for h in e.block_hashes}
        host_stored = {h for e in seen if e.medium is Medium.HOST for h in e.block_hashes}
        assert tier_stored == {1, 2, 3, 4} and host_stored == {1, 2, 3, 4}


async def test_flush_of_a_dead_tier_returns_zero_quickly(fp):
    from tusk.kvserver import start_server

    server = start_server(maxmemory="32mb")
    client = KVTierClient(server.url, fp, timeout_s=0.5)
    store = TieredBlockStore(None, client)
    server.kill()
    started = time.monotonic()
    store.store("r", [1, 2], [value(1), value(2)])
    assert await store.flush("r", timeout=5) == 0
    assert time.monotonic() - started < 2
    await store.close()
    server.stop()


def test_server_args_make_a_cache():
    args = server_args("1gb", port=7000, password="pw")
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--maxmemory"] == "1gb" and pairs["--maxmemory-policy"] == "allkeys-lru"
    assert pairs["--save"] == "" and pairs["--appendonly"] == "no"
    assert pairs["--notify-keyspace-events"] == "Ee" and pairs["--requirepass"] == "pw"
    assert "--requirepass" not in server_args()


async def test_eviction_watcher_reports_tier_evictions(kv_server):
    fp = fingerprint()
    hub = EventHub()
    seen = recorder(hub)
    watcher = TierEvictionWatcher(kv_server.url, fp, hub)
    assert await watcher.start()
    raw = redis.Redis.from_url(kv_server.url)
    raw.config_set("maxmemory", "2mb")
    try:
        async with KVTierClient(kv_server.url, fp) as client:
            block = value(1)
            for start in range(0, 200, 20):
                await client.put_values(list(range(start, start + 20)), [block] * 20)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            removed = {h for e in seen if e.kind is EventKind.REMOVED for h in e.block_hashes}
            assert removed and removed <= set(range(200))
            assert all(e.medium is Medium.TIER for e in seen)
            present = await client.contains(sorted(removed))
            assert not any(present)
    finally:
        raw.close()
        await watcher.stop()


async def test_eviction_watcher_reports_a_restarted_server_as_cleared(fp):
    from tusk.kvserver import start_server

    server = start_server(maxmemory="32mb")
    hub = EventHub()
    seen = recorder(hub)
    watcher = TierEvictionWatcher(server.url, fp, hub, reconnect_s=0.05)
    try:
        assert await watcher.start()
        port = server.port
        server.kill()
        server.stop()
        server = start_server(port=port, maxmemory="32mb")
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert seen == [KVEvent(EventKind.CLEARED, Medium.TIER, ())]
    finally:
        await watcher.stop()
        server.stop()


def test_metrics_can_be_exposed_on_a_worker_registry():
    from prometheus_client import CollectorRegistry, generate_latest

    from tusk.kvtier import metrics

    registry = CollectorRegistry()
    metrics.register(registry)
    metrics.register(registry)  # twice is fine
    text = generate_latest(registry).decode()
    assert "tusk_kvtier_corrupt_blocks_total" in text and "tusk_kvtier_host_blocks" in text

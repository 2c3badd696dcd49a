"""KVTransfer on synthetic KV cache tensors: save from the engine thread, load into another cache."""

from __future__ import annotations

import threading

import pytest
import torch
from kvtier_helpers import metric
from tusk.worker.kv_transfer import KVTransfer, kv_fingerprint

from tusk.config import KVTierConfig
from tusk.hashing import block_hashes
from tusk.kvtier.client import KVTierClient

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 24, 4, 2, 8


def cache(dtype: torch.dtype, seed: int | None = None) -> torch.Tensor:
    shape = (LAYERS, 2, BLOCKS, BS, HEADS, DIM)
    if seed is None:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def config(url: str | None, host_blocks: int = 0, **kw) -> KVTierConfig:
    return KVTierConfig(url=url, host_cache_blocks=host_blocks, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_save_on_engine_thread_then_load_into_another_cache(kv_server, dtype):
    source, target = cache(dtype, seed=1), cache(dtype)
    hashes = block_hashes(list(range(7 * BS)), BS)
    src_ids, dst_ids = [3, 9, 1, 20, 5, 6, 0], [10, 11, 12, 13, 14, 15, 16]
    writer = KVTransfer.from_config(config(kv_server.url), source, "model-x", chunk_blocks=2)
    reader = KVTransfer.from_config(config(kv_server.url), target, "model-x", chunk_blocks=2)
    try:
        engine_thread = threading.Thread(target=writer.save_blocks, args=("r", hashes, src_ids))
        engine_thread.start()
        engine_thread.join()
        source[:, :, src_ids] = 0  # the engine reuses the blocks at once: the snapshot must hold
        assert await writer.flush("r", timeout=5) == 7
        assert await reader.load_prefix(hashes, dst_ids) == 7
        expected = cache(dtype, seed=1)[:, :, src_ids]
        assert torch.equal(target[:, :, dst_ids], expected)
        assert target[:, :, :10].abs().sum() == 0  # nothing else was touched
    finally:
        await writer.close()
        await reader.close()


async def test_load_stops_at_first_missing_block(kv_server):
    source, target = cache(torch.float32, seed=2), cache(torch.float32)
    hashes = block_hashes(list(range(5 * BS)), BS)
    writer = KVTransfer.from_config(config(kv_server.url), source, "m")
    reader = KVTransfer.from_config(config(kv_server.url), target, "m", chunk_blocks=2)
    try:
        writer.save_blocks("r", hashes[:2] + hashes[3:], [0, 1, 3, 4])  # block 2 never saved
        assert await writer.flush("r", timeout=5) == 4
        assert await reader.load_prefix(hashes, [5, 6, 7, 8, 9]) == 2
        assert torch.equal(target[:, :, [5, 6]], source[:, :, [0, 1]])
        assert target[:, :, [7, 8, 9]].abs().sum() == 0
    finally:
        await writer.close()
        await reader.close()


async def test_other_model_or_dtype_never_loads(kv_server):
    hashes = block_hashes(list(range(2 * BS)), BS)
    writer = KVTransfer.from_config(config(kv_server.url), cache(torch.float32, seed=3), "m")
    other_model = KVTransfer.from_config(config(kv_server.url), cache(torch.float32), "other")
    other_dtype = KVTransfer.from_config(config(kv_server.url), cache(torch.float16), "m")
    try:
        writer.save_blocks("r", hashes, [0, 1])
        assert await writer.flush("r", timeout=5) == 2
        assert await other_model.load_prefix(hashes, [0, 1]) == 0
        assert await other_dtype.load_prefix(hashes, [0, 1]) == 0
        assert writer.fingerprint.digest() != other_dtype.fingerprint.digest()
    finally:
        for t in (writer, other_model, other_dtype):
            await t.close()


async def test_host_cache_serves_without_a_tier():
    source = cache(torch.float32, seed=4)
    transfer = KVTransfer.from_config(config(None, host_blocks=8), source, "m")
    try:
        hashes = block_hashes(list(range(3 * BS)), BS)
        transfer.save_blocks("r", hashes, [0, 1, 2])
        assert await transfer.flush("r", timeout=5) == 0  # nothing goes to a tier
        assert await transfer.load_prefix(hashes, [7, 8, 9]) == 3
        assert torch.equal(source[:, :, [7, 8, 9]], source[:, :, [0, 1, 2]])
    finally:
        await transfer.close()
    assert KVTransfer.from_config(config(None), source, "m") is None


async def test_snapshots_are_bounded(kv_server):
    source = cache(torch.float32, seed=5)
    one_block = LAYERS * 2 * BS * HEADS * DIM * 4 + 64
    transfer = KVTransfer.from_config(config(kv_server.url), source, "m", max_snapshot_bytes=2 * one_block)
    try:
        hashes = block_hashes(list(range(4 * BS)), BS)
        before = metric("tusk_kvtier_dropped_writes_total", reason="inflight_full")
        assert transfer.save_blocks("a", hashes[:2], [0, 1])
        assert not transfer.save_blocks("b", hashes[2:], [2, 3])  # a's snapshot still queued
        assert metric("tusk_kvtier_dropped_writes_total", reason="inflight_full") == before + 2
        assert await transfer.flush("a", timeout=5) == 2
        assert transfer.save_blocks("b", hashes[2:], [2, 3])
        assert await transfer.flush("b", timeout=5) == 2
    finally:
        await transfer.close()


async def test_forgotten_requests_are_not_tracked(kv_server):
    transfer = KVTransfer.from_config(config(kv_server.url), cache(torch.float32, seed=6), "m")
    try:
        hashes = block_hashes(list(range(2 * BS)), BS)
        transfer.forget("gone")  # the engine may finish a request before its last save
        transfer.save_blocks("gone", hashes, [0, 1])
        assert await transfer.flush("gone", timeout=5) == 0
        assert not transfer._requests
        await transfer.close()  # lets queued writes finish: forgotten only means untracked
        async with KVTierClient(kv_server.url, transfer.fingerprint) as client:
            assert await client.contains(hashes) == [True, True]
    finally:
        await transfer.close()


def test_fingerprint_and_bad_caches():
    fp = kv_fingerprint("m", cache(torch.bfloat16))
    assert (fp.dtype, fp.block_size, fp.num_layers, fp.num_kv_heads, fp.head_dim) == (
        "bfloat16",
        BS,
        LAYERS,
        HEADS,
        DIM,
    )
    with pytest.raises(ValueError, match="kv_cache must be"):
        kv_fingerprint("m", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unsupported KV cache dtype"):
        kv_fingerprint("m", torch.zeros((1, 2, 1, 1, 1, 1), dtype=torch.float64))


async def test_save_argument_errors(kv_server):
    transfer = KVTransfer.from_config(config(kv_server.url), cache(torch.float32), "m")
    try:
        with pytest.raises(ValueError, match="2 hashes but 1 block ids"):
            transfer.save_blocks("r", [1, 2], [0])
        assert await transfer.load_prefix([], []) == 0
    finally:
        await transfer.close()


async def test_tracked_requests_are_bounded(kv_server, monkeypatch):
    import tusk.worker.kv_transfer as kv_transfer

    monkeypatch.setattr(kv_transfer, "_MAX_TRACKED_REQUESTS", 2)
    transfer = KVTransfer.from_config(config(kv_server.url), cache(torch.float32, seed=7), "m")
    try:
        hashes = block_hashes(list(range(3 * BS)), BS)
        for i, rid in enumerate(["a", "b", "c"]):  # "a" never flushed by its caller
            transfer.save_blocks(rid, [hashes[i]], [i])
        assert await transfer.flush("a", timeout=5) == 0  # dropped from tracking, oldest first
        assert await transfer.flush("b", timeout=5) == 1
        assert await transfer.flush("c", timeout=5) == 1
    finally:
        await transfer.close()

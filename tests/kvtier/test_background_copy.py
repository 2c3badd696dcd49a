"""Write-through copies run off the engine's step thread; the blocks stay pinned until copied."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from tusk.worker.engine import LLMEngine
from tusk.worker.kv_transfer import KVTransfer
from tusk.worker.sequence import SamplingParams

from tusk.config import EngineConfig, KVTierConfig
from tusk.hashing import block_hashes

LAYERS, BLOCKS, BS, HEADS, DIM = 2, 16, 4, 2, 8


def _source() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn((LAYERS, 2, BLOCKS, BS, HEADS, DIM), generator=gen)


def _copy_threads(transfer: KVTransfer, gate: threading.Event | None = None) -> list[int]:
    """Record which thread runs each snapshot copy (which waits for ``gate`` if given)."""
    threads: list[int] = []
    copy_out = transfer._copy_out

    def recording(block_ids):
        threads.append(threading.get_ident())
        if gate is not None:
            assert gate.wait(10)
        return copy_out(block_ids)

    transfer._copy_out = recording
    return threads


async def test_save_with_release_copies_on_a_worker_thread_then_releases_once():
    source = _source()
    expected = source[:, :, [0, 5, 2]].clone()
    transfer = KVTransfer.from_config(KVTierConfig(url=None, host_cache_blocks=8), source, "m")
    threads = _copy_threads(transfer)
    released = threading.Event()
    calls = []
    try:
        hashes = block_hashes(list(range(3 * BS)), BS)
        assert transfer.save_blocks("r", hashes, [0, 5, 2], release=lambda: (calls.append(1), released.set()))
        assert threading.get_ident() not in threads  # nothing was copied by the caller
        assert await transfer.flush("r", timeout=5) == 0  # no tier: the host cache has them
        assert released.wait(5) and calls == [1]
        assert threads and threading.get_ident() not in threads
        source[:, :, [0, 5, 2]] = 0  # reused after release: the cached copy must not change
        assert await transfer.load_prefix(hashes, [9, 10, 11]) == 3
        assert torch.equal(source[:, :, [9, 10, 11]], expected)
    finally:
        await transfer.close()


async def test_refused_saves_release_at_once():
    source = _source()
    one_block = LAYERS * 2 * BS * HEADS * DIM * 4 + 64
    transfer = KVTransfer.from_config(
        KVTierConfig(url=None, host_cache_blocks=8), source, "m", max_snapshot_bytes=one_block
    )
    calls = []
    hashes = block_hashes(list(range(2 * BS)), BS)
    assert not transfer.save_blocks("big", hashes, [0, 1], release=lambda: calls.append("full"))
    await transfer.close()
    assert not transfer.save_blocks("late", hashes[:1], [0], release=lambda: calls.append("closed"))
    assert calls == ["full", "closed"]


def test_engine_step_thread_does_not_copy_and_unpins_after(tiny_model: Path):
    tier = KVTierConfig(url=None, host_cache_blocks=32)
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=32, block_size=4), kv_tier=tier)
    try:
        gate = threading.Event()
        threads = _copy_threads(engine.connector.transfer, gate)
        prompt = list(range(3, 3 + 4 * 4 + 2))  # four full blocks
        engine.add_request("r", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        for _ in range(3):
            engine.step()
        assert engine.blocks.num_free == 32 - 4  # finished, but the full blocks wait for their copy
        gate.set()
        for _ in range(200):  # copied in the background, then unpinned on the step thread
            engine.step()
            if threads and engine.blocks.num_free == 32:
                break
            threading.Event().wait(0.05)
        assert threads and threading.get_ident() not in threads
        assert engine.blocks.num_free == 32
        # The same prompt again is served from the host copy and still decodes.
        out = engine.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True))
        assert len(out[0]) == 2
    finally:
        engine.close()

"""vLLM/SGLang KV events (ZMQ + msgpack) into tusk's prefix index, both wire shapes.

The payloads are built with msgspec structs declared like vLLM's (``vllm/distributed/
kv_events.py``): tagged structs encoded as maps with ``"type"`` (vLLM since mid-2026) or as
arrays with the tag first (``array_like=True``: SGLang and older vLLM).
"""

from __future__ import annotations

import asyncio

import msgspec
import zmq
import zmq.asyncio
from tusk.router.kv_events_zmq import EngineEventFeed, ZmqKvEventSubscriber
from tusk.router.prefix_index import PrefixIndex

from tusk.hashing import block_hashes

BS = 4
BIG = (1 << 64) - 5  # above 2^63: must survive msgpack as an unsigned 64-bit int


# -- vLLM's event classes, as declared upstream (map form) -----------------------------------------
class MapEvent(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class BlockStored(MapEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list | None = None
    group_idx: int | None = None  # newer fields tusk does not use: ignored
    kv_cache_spec_kind: str | None = "full_attention"


class BlockRemoved(MapEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(MapEvent):
    pass


class FutureEvent(MapEvent):  # an event type tusk does not know yet
    what: int = 1


class MapBatch(msgspec.Struct):
    ts: float
    events: list
    data_parallel_rank: int | None = None


# -- the older tagged-array form (SGLang, vLLM before mid-2026) -----------------------------------
class ArrayEvent(msgspec.Struct, array_like=True, tag=True):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class ArrayBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list
    data_parallel_rank: int | None = None


ENC = msgspec.msgpack.Encoder()
TOKENS = list(range(100, 112))  # three blocks of 4


def map_batch(*events) -> bytes:  # noqa: ANN002
    return ENC.encode(MapBatch(1.0, list(events), 0))


def array_batch(*events) -> bytes:  # noqa: ANN002
    return ENC.encode(ArrayBatch(1.0, list(events), 0))


def feed() -> tuple[PrefixIndex, EngineEventFeed]:
    index = PrefixIndex()
    return index, EngineEventFeed(index, "vllm-0", BS)


def test_map_form_builds_tusk_keys_from_tokens_and_ignores_unknowns() -> None:
    index, f = feed()
    assert msgspec.msgpack.decode(map_batch(AllBlocksCleared()))["events"][0] == {"type": "AllBlocksCleared"}
    f.apply_payload(
        map_batch(BlockStored([BIG, b"\x01" * 32], None, TOKENS[:8], BS, None, "GPU"), FutureEvent())
    )
    f.apply_payload(map_batch(BlockStored([7], b"\x01" * 32, TOKENS[8:], BS, None, None)))
    ours = block_hashes(TOKENS, BS)
    assert index.match(ours) == {"vllm-0": 3}  # engine hashes are mapped, never used as keys
    assert f.stats.stored_blocks == 3 and f.stats.malformed == 0
    f.apply_payload(map_batch(BlockRemoved([7], "GPU")))
    assert index.match(ours) == {"vllm-0": 2}
    f.apply_payload(map_batch(AllBlocksCleared()))
    assert index.match(ours) == {} and not f.keys


def test_tagged_array_form() -> None:
    index, f = feed()
    assert msgspec.msgpack.decode(array_batch(ArrayAllBlocksCleared()))[1] == [["AllBlocksCleared"]]
    f.apply_payload(array_batch(ArrayBlockStored([BIG, 2, 3], None, TOKENS, BS, None, None)))
    ours = block_hashes(TOKENS, BS)
    assert index.match(ours) == {"vllm-0": 3}
    f.apply_payload(array_batch(ArrayBlockRemoved([3], None)))
    assert index.match(ours) == {"vllm-0": 2}
    f.apply_payload(array_batch(ArrayAllBlocksCleared()))
    assert index.match(ours) == {}


def test_malformed_events_are_counted_and_never_corrupt_the_index() -> None:
    index, f = feed()
    ours = block_hashes(TOKENS, BS)
    f.apply_payload(b"\xc1 not msgpack")
    f.apply_payload(ENC.encode({"no": "events"}))
    f.apply_payload(
        ENC.encode([1.0, [["BlockStored", "not-a-list"], {"type": "BlockRemoved", "block_hashes": [1.5]}]])
    )
    f.apply_payload(map_batch(BlockStored([1, 2], None, TOKENS[:5], BS, None, None)))  # 5 tokens for 2 blocks
    f.apply_payload(map_batch(BlockStored([9], 12345, TOKENS[4:8], BS, None, None)))  # parent never seen
    f.apply_payload(map_batch(BlockStored([8], None, TOKENS[:4], BS, None, None, lora_name="adapter")))
    f.apply_payload(map_batch(BlockStored([8], None, TOKENS[:8], 8, None, None)))  # engine block size differs
    assert index.match(ours) == {} and not f.keys
    assert f.stats.malformed == 5
    assert f.stats.skipped == {
        "token_count_mismatch": 1,
        "unknown_parent": 1,
        "extra_keys": 1,
        "block_size_mismatch": 1,
    }
    # A good event in the same batch as a bad one still lands.
    f.apply_payload(map_batch(BlockStored([1], None, TOKENS[:4], BS, None, None)))
    f.apply_payload(
        ENC.encode([2.0, [["Bogus"], "garbage", ["BlockStored", [2], 1, TOKENS[4:8], BS, None, None]]])
    )
    assert index.match(ours) == {"vllm-0": 2}


class FakePublisher:
    """vLLM's ZmqEventPublisher in miniature: PUB (topic, seq, payload) + ROUTER replay."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.replay_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.buffer: list[tuple[int, bytes]] = []
        self.task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, seq: int, payload: bytes, *, send: bool = True) -> None:
        self.buffer.append((seq, payload))
        if send:
            await self.pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def close(self) -> None:
        self.task.cancel()
        self.pub.close(0)
        self.router.close(0)


def stored(i: int) -> bytes:
    parent = None if i == 0 else 1000 + i - 1
    return map_batch(BlockStored([1000 + i], parent, TOKENS[i * BS : (i + 1) * BS], BS, None, "GPU"))


async def test_zmq_subscriber_repairs_gaps_through_replay_and_skips_out_of_order() -> None:
    ctx = zmq.asyncio.Context()
    publisher = FakePublisher(ctx)
    index, f = feed()
    sub = ZmqKvEventSubscriber(f, publisher.endpoint, publisher.replay_endpoint, topic=b"kv", context=ctx)
    sub.start()
    ours = block_hashes(TOKENS, BS)
    try:
        await sub.connected.wait()
        # PUB/SUB drops messages until the subscription is live: resend batch 0 until it lands.
        for _ in range(1000):  # generous: a busy CI machine
            await publisher.pub.send_multipart([b"kv", (0).to_bytes(8, "big"), stored(0)])
            await asyncio.sleep(0.02)
            if f.stats.batches:
                break
        publisher.buffer.append((0, stored(0)))
        await publisher.publish(1, stored(1), send=False)  # lost on the wire
        await publisher.publish(2, stored(2))
        for _ in range(1000):
            if index.match(ours).get("vllm-0") == 3:
                break
            await asyncio.sleep(0.02)
        assert index.match(ours) == {"vllm-0": 3}
        assert f.stats.gaps == 1 and f.stats.resyncs == 1
        await sub.handle([b"kv", (1).to_bytes(8, "big"), map_batch(AllBlocksCleared())])  # stale
        assert f.stats.out_of_order == 1 and index.match(ours) == {"vllm-0": 3}
        await sub.handle([b"kv", b"short", b""])
        assert f.stats.malformed == 1
    finally:
        await sub.close()
        await publisher.close()
        ctx.term()


async def test_unrepairable_gap_drops_the_workers_entries_then_rebuilds() -> None:
    index, f = feed()
    sub = ZmqKvEventSubscriber(f, "tcp://127.0.0.1:9", None)  # no replay socket
    ours = block_hashes(TOKENS, BS)
    await sub.handle([b"", (0).to_bytes(8, "big"), stored(0)])
    await sub.handle([b"", (1).to_bytes(8, "big"), stored(1)])
    assert index.match(ours) == {"vllm-0": 2}
    await sub.handle(
        [b"", (5).to_bytes(8, "big"), map_batch(BlockStored([77], None, TOKENS[:4], BS, None, None))]
    )
    assert f.stats.resync_failures == 1
    assert index.match(ours) == {"vllm-0": 1}  # only what came after the gap
    await sub.handle([b"", (0).to_bytes(8, "big"), stored(0)])  # the engine restarted
    assert f.stats.restarts == 1 and index.match(ours) == {"vllm-0": 1}

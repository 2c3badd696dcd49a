"""vLLM's and SGLang's KV cache events over ZMQ, mapped onto tusk's prefix index.

Wire format (vLLM ``vllm/distributed/kv_events.py``; SGLang publishes the same):

* a PUB socket sends multipart messages ``(topic, seq, payload)``: ``seq`` is an 8-byte
  big-endian counter starting at 0, ``payload`` a msgpack ``EventBatch``;
* ``EventBatch`` is ``[ts, events, data_parallel_rank]`` (array form) or a map with those keys;
* each event is a msgspec tagged struct, either a map with ``"type"`` (vLLM since mid-2026) or
  an array whose first element is the tag (SGLang, older vLLM):
  ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, ...)``, ``BlockRemoved(block_hashes, medium, ...)``,
  ``AllBlocksCleared()``. Hashes are ints (possibly above 2^63) or bytes; unknown keys and
  trailing fields are ignored;
* an optional ROUTER socket replays buffered batches: send ``(b"", start_seq as 8 bytes)``,
  receive ``(b"", seq, payload)`` frames up to ``seq == -1``.

The engine's hashes are never trusted as tusk keys (their seeds and algorithms differ per engine
and version). ``EngineEventFeed`` recomputes tusk's own block keys from each stored event's
``token_ids`` (``tusk.hashing``, chained from the parent's tusk key), remembers engine hash ->
tusk key, and uses that map for removals, as llm-d's KV-cache indexer does. Anything malformed,
out of order or unchainable is counted, logged and skipped; a sequence gap is repaired through
the replay socket, and when that fails the worker's entries are dropped (stale is worse than
empty) and rebuilt by later events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from tusk.router.prefix_index import PrefixIndex

from tusk.hashing import ROOT_HASH, block_hashes

log = logging.getLogger("tusk.router.kv_events_zmq")

END_SEQ = -1
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
)
_REMOVED_FIELDS = ("block_hashes", "medium")
_MEDIA = {None: "device", "GPU": "device", "gpu": "device", "CPU": "host", "cpu": "host"}


class EventDecodeError(ValueError):
    """A payload or event that does not follow the format."""


@dataclass
class BlockStored:
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora: Any = None  # lora_id or lora_name: blocks of an adapter, keyed differently
    extra_keys: Any = None


@dataclass
class BlockRemoved:
    block_hashes: list[int | bytes]
    medium: str | None = None


@dataclass
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


def _hash(value: Any) -> int | bytes:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise EventDecodeError(f"a block hash must be an int or bytes, got {type(value).__name__}")
    return value


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(tag, fields by name) from either the map or the tagged-array form."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        return tag, {n: raw.get(n) for n in names}
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        values = raw[1:]
        return raw[0], {n: values[i] if i < len(values) else None for i, n in enumerate(names)}
    raise EventDecodeError(f"an event must be a map or a tagged array, got {type(raw).__name__}")


def decode_event(raw: Any) -> Event | None:
    """One event; None for an event type tusk does not know (ignored, like unknown keys)."""
    tag = raw.get("type") if isinstance(raw, dict) else raw[0] if isinstance(raw, list) and raw else None
    if tag == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        hashes, tokens, size = f["block_hashes"], f["token_ids"], f["block_size"]
        if not isinstance(hashes, list) or not isinstance(tokens, list):
            raise EventDecodeError("BlockStored needs block_hashes and token_ids lists")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise EventDecodeError("BlockStored needs a positive block_size")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise EventDecodeError("BlockStored token_ids must be non-negative ints")
        parent = f["parent_block_hash"]
        medium = f["medium"]
        return BlockStored(
            block_hashes=[_hash(h) for h in hashes],
            parent_block_hash=None if parent is None else _hash(parent),
            token_ids=tokens,
            block_size=size,
            medium=medium if isinstance(medium, str) else None,
            lora=f["lora_name"] if f["lora_name"] is not None else f["lora_id"],
            extra_keys=f["extra_keys"],
        )
    if tag == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        if not isinstance(f["block_hashes"], list):
            raise EventDecodeError("BlockRemoved needs a block_hashes list")
        medium = f["medium"]
        return BlockRemoved(
            [_hash(h) for h in f["block_hashes"]], medium if isinstance(medium, str) else None
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None
    raise EventDecodeError("an event has no type tag")


def decode_batch(payload: bytes) -> tuple[float, list[Any], int | None]:
    """(ts, raw events, data-parallel rank) of one payload; events are decoded one by one, so a
    single bad event does not cost the batch."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"payload is not msgpack: {exc}") from None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    elif isinstance(raw, dict) and "events" in raw:
        ts, events, rank = raw.get("ts", 0.0), raw["events"], raw.get("data_parallel_rank")
    else:
        raise EventDecodeError("payload is not an EventBatch")
    if not isinstance(events, list) or not isinstance(ts, int | float):
        raise EventDecodeError("EventBatch needs a number ts and an events list")
    return float(ts), events, rank if isinstance(rank, int) else None


@dataclass
class FeedStats:
    batches: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    malformed: int = 0  # payloads or events that do not decode
    out_of_order: int = 0  # sequence numbers at or below the last one applied
    gaps: int = 0
    resyncs: int = 0  # gaps repaired through the replay socket
    resync_failures: int = 0  # gaps that could not be repaired: the worker's entries were dropped
    restarts: int = 0  # the publisher started over at sequence 0
    skipped: dict[str, int] = field(default_factory=dict)  # events skipped, by reason

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class EngineEventFeed:
    """Applies one engine's events to the prefix index under ``worker_id`` in tusk's keys."""

    def __init__(self, index: PrefixIndex, worker_id: str, block_size: int) -> None:
        self.index = index
        self.worker_id = worker_id
        self.block_size = block_size
        self.keys: dict[int | bytes, int] = {}  # engine hash -> tusk block key
        self.stats = FeedStats()

    def reset(self) -> None:
        """Forget everything this engine was believed to hold."""
        self.index.remove_worker(self.worker_id)
        self.keys.clear()

    def apply_payload(self, payload: bytes) -> None:
        try:
            _, events, _ = decode_batch(payload)
        except EventDecodeError as exc:
            self.stats.malformed += 1
            log.warning("malformed KV event batch skipped: %s", exc, extra={"worker": self.worker_id})
            return
        self.stats.batches += 1
        for raw in events:
            try:
                event = decode_event(raw)
            except (EventDecodeError, TypeError, IndexError) as exc:
                self.stats.malformed += 1
                log.warning("malformed KV event skipped: %s", exc, extra={"worker": self.worker_id})
                continue
            if event is not None:
                self.apply(event)

    def apply(self, event: Event) -> None:
        if isinstance(event, BlockStored):
            self._stored(event)
        elif isinstance(event, BlockRemoved):
            medium = _MEDIA.get(event.medium, "host")
            keys = []
            for h in event.block_hashes:
                key = self.keys.pop(h, None) if medium == "device" else self.keys.get(h)
                if key is not None:
                    keys.append(key)
            self.stats.removed_blocks += len(keys)
            self.index.apply_event(self.worker_id, "removed", medium, keys)
        else:
            self.stats.cleared += 1
            self.index.apply_event(self.worker_id, "cleared", "device", [])
            self.index.apply_event(self.worker_id, "cleared", "host", [])
            self.keys.clear()

    def _stored(self, event: BlockStored) -> None:
        n = len(event.block_hashes)
        if event.block_size != self.block_size:
            self.stats.skip("block_size_mismatch")
            return
        if len(event.token_ids) != n * event.block_size:
            self.stats.skip("token_count_mismatch")
            self.stats.malformed += 1
            return
        if event.lora is not None or (event.extra_keys and any(k for k in event.extra_keys)):
            self.stats.skip("extra_keys")  # adapter / multimodal / salted blocks: other keys
            return
        if event.parent_block_hash is None:
            parent = ROOT_HASH
        else:
            parent = self.keys.get(event.parent_block_hash)
            if parent is None:
                self.stats.skip("unknown_parent")  # its prefix was never seen: cannot chain
                return
        keys = block_hashes(event.token_ids, event.block_size, parent=parent)
        for h, key in zip(event.block_hashes, keys, strict=True):
            self.keys[h] = key
        self.stats.stored_blocks += n
        self.index.apply_event(self.worker_id, "stored", _MEDIA.get(event.medium, "host"), keys)


class ZmqKvEventSubscriber:
    """Follows one engine's PUB socket, repairing gaps through its replay socket."""

    def __init__(
        self,
        feed: EngineEventFeed,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: bytes = b"",
        replay_timeout_s: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.feed = feed
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.replay_timeout_s = replay_timeout_s
        self.context = context or zmq.asyncio.Context.instance()
        self.last: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"kv events {self.endpoint}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run(self) -> None:
        sub = self.context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.endpoint)
        self.connected.set()
        try:
            while True:
                frames = await sub.recv_multipart()
                await self.handle(frames)
        finally:
            sub.close(0)

    async def handle(self, frames: list[bytes]) -> None:
        """One PUB message: check its sequence number, repair a gap, apply it."""
        stats = self.feed.stats
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.malformed += 1
            log.warning("malformed KV event message (%d frames) skipped", len(frames))
            return
        _, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        last = self.last
        if last is not None:
            if seq == 0 and last > 0:
                stats.restarts += 1
                log.info(
                    "KV event publisher restarted; forgetting its blocks",
                    extra={"worker": self.feed.worker_id},
                )
                self.feed.reset()
            elif seq <= last:
                stats.out_of_order += 1
                log.warning("out-of-order KV event batch %d (last %d) skipped", seq, last)
                return
            elif seq > last + 1:
                stats.gaps += 1
                await self._repair(last + 1, seq)
        self.feed.apply_payload(payload)
        self.last = seq

    async def _repair(self, start: int, stop: int) -> None:
        """Apply batches ``start .. stop-1`` from the replay socket, or drop the worker's entries."""
        stats = self.feed.stats
        replayed = await self.replay(start) if self.replay_endpoint else None
        wanted = {s: p for s, p in (replayed or []) if start <= s < stop}
        if replayed is None or len(wanted) != stop - start:
            stats.resync_failures += 1
            log.warning(
                "KV events %d..%d lost and not replayable; dropping the worker's index entries",
                start,
                stop - 1,
                extra={"worker": self.feed.worker_id},
            )
            self.feed.reset()
            return
        for seq in range(start, stop):
            self.feed.apply_payload(wanted[seq])
        stats.resyncs += 1

    async def replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Batches from ``start`` on, as the engine's replay socket sends them; None on failure."""
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(int(self.replay_timeout_s * 1000)):
                    return None
                frames = await dealer.recv_multipart()
                if len(frames) != 3:
                    return None
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq == END_SEQ:
                    return out
                out.append((seq, frames[2]))
        finally:
            dealer.close(0)

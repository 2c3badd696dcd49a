"""Turn the tier's own evictions into KV events, so the router's index forgets evicted blocks.

Redis evicts under ``allkeys-lru`` without telling clients. Two ways to learn of it were
considered: polling ``contains`` for the blocks a worker once stored (cost grows with the index,
and it only notices at the next poll), or keyspace notifications (``notify-keyspace-events Ee``:
the server publishes every evicted key on ``__keyevent@<db>__:evicted`` as it evicts). We use the
notifications: they are exact, immediate and cost nothing when nothing is evicted. The managed
tier enables them through ``tusk.kvserver.server_args``; against an external server the watcher
tries ``CONFIG SET`` and, where that is not allowed (many hosted Redis offerings), reports False
and the index keeps stale tier entries, which costs the router a mis-estimate and the worker a
miss, never a wrong answer.

A restarted server (no persistence) has lost every block: when the watcher reconnects to a server
with a new ``run_id`` it emits CLEARED for the tier. A tier that is not up yet (a worker pod that
starts before it) or goes away is retried with a backoff, doubling up to ``max_reconnect_s``; until
then evictions go unseen, which costs cache estimates, never answers. With Redis Cluster, notifications are per
node; the watcher follows the node of its URL only (see docs/kv-tier.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from tusk.kvformat import KEY_PREFIX, ModelFingerprint
from tusk.kvtier.connect import connect, is_cluster
from tusk.kvtier.events import EventHub, EventKind, Medium

log = logging.getLogger(__name__)

_NEEDED_FLAGS = "Ee"


def _flags_enabled(current: str) -> bool:
    return "E" in current and ("e" in current or "A" in current)


class TierEvictionWatcher:
    def __init__(
        self,
        url: str,
        fingerprint: ModelFingerprint | str,
        events: EventHub,
        *,
        timeout_s: float = 2.0,
        reconnect_s: float = 0.5,
        max_reconnect_s: float = 30.0,
    ) -> None:
        self.url = url
        self.events = events
        digest = fingerprint if isinstance(fingerprint, str) else fingerprint.digest()
        self._prefix = f"{KEY_PREFIX}:{digest}:".encode()
        self._timeout_s = timeout_s
        self._reconnect_s = reconnect_s
        self._max_reconnect_s = max(max_reconnect_s, reconnect_s)
        self._task: asyncio.Task | None = None
        self._run_id: str | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> bool:
        """Enable notifications if needed and start listening; False if the server refuses them.
        An unreachable tier is not a refusal: the watch keeps trying in the background."""
        if is_cluster(self.url):
            log.warning("KV tier eviction watch does not follow Redis Cluster nodes; evictions unseen")
            return False
        redis = connect(self.url, timeout_s=self._timeout_s)
        reachable = True
        try:
            if not await self._enable(redis):
                return False
        except (RedisError, OSError) as exc:
            log.warning("KV tier unreachable; the eviction watch keeps retrying: %s", exc)
            reachable = False
        finally:
            await redis.aclose()
        self._task = asyncio.create_task(self._run(), name="kvtier-eviction-watch")
        if reachable:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self._timeout_s)
        return True

    async def _enable(self, redis) -> bool:
        current = (await redis.config_get("notify-keyspace-events")).get(b"notify-keyspace-events", b"")
        current = current.decode() if isinstance(current, bytes) else str(current)
        if _flags_enabled(current):
            return True
        try:
            await redis.config_set("notify-keyspace-events", "".join(sorted(set(current + _NEEDED_FLAGS))))
        except RedisError as exc:
            log.warning("cannot enable keyspace notifications on the KV tier (%s); evictions unseen", exc)
            return False
        return True

    async def _run(self) -> None:
        delay = self._reconnect_s
        while True:
            redis = connect(self.url, timeout_s=self._timeout_s)
            pubsub = redis.pubsub()
            try:
                info = await redis.info("server")
                run_id = str(info.get("run_id", ""))
                if self._run_id is not None and run_id != self._run_id:
                    self.events.emit(EventKind.CLEARED, Medium.TIER)
                self._run_id = run_id
                await self._enable(redis)  # a restarted external server forgot the setting
                db = redis.connection_pool.connection_kwargs.get("db", 0)
                await pubsub.subscribe(f"__keyevent@{db}__:evicted")
                self._subscribed.set()
                delay = self._reconnect_s
                while True:
                    # Poll with a timeout rather than block on the socket: the client's socket
                    # timeout would otherwise turn a quiet tier into a reconnect loop.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_evicted(message.get("data"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.info("KV tier eviction watch reconnecting in %.1f s: %s", delay, exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await redis.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_reconnect_s)

    def _on_evicted(self, key) -> None:
        if not isinstance(key, bytes) or not key.startswith(self._prefix):
            return
        try:
            block_hash = int(key[len(self._prefix) :], 16)
        except ValueError:
            return
        self.events.emit(EventKind.REMOVED, Medium.TIER, [block_hash])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

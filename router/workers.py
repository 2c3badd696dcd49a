"""One gRPC client per worker: health, load polling and the KV event feed.

Each worker gets its own ``grpc.aio`` channel and a small background loop. The loop keeps the
worker's ``WorkerState`` (what policies see) fresh from GetLoad, flips ``healthy`` on failures so
policies stop choosing a dead worker within one poll interval, and feeds the worker's KV events
into the model's prefix index so cache-aware policies see real cache contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from tusk.router.load_account import WorkerLoad
from tusk.router.policies.base import WorkerState

from tusk.config import Role
from tusk.protocol import pb, rpc

log = logging.getLogger("tusk.router.workers")

GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
]

SLOW_POLLS_TO_FAIL = 3

KvEventSink = Callable[[str, pb.KvEventBatch], None]


class WorkerClient:
    """Router-side handle on one worker process."""

    def __init__(
        self,
        address: str,
        role: Role,
        *,
        poll_interval_s: float = 0.5,
        rpc_timeout_s: float = 2.0,
        kv_events: KvEventSink | None = None,
        on_change: Callable[[WorkerClient], None] | None = None,
        expect_model: frozenset[str] | None = None,
        expect_block_size: int | None = None,
    ) -> None:
        self.address = address
        self.state = WorkerState(worker_id=address, address=address, role=role, healthy=False)
        # router-side load prediction, corrected by each LoadReport (tusk.router.load_account)
        self.load = WorkerLoad(self.state)
        self.channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = rpc.WorkerStub(self.channel)
        self.poll_interval_s = poll_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.model_name: str | None = None
        self.block_size: int | None = None
        self.expect_model = expect_model
        self.expect_block_size = expect_block_size
        self.mismatch: str | None = None  # why the worker is not what discovery expected
        self._kv_events = kv_events
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_task: asyncio.Task[None] | None = None
        self._closed = False
        self._slow_polls = 0

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._poll_loop(), name=f"poll {self.address}"))

    async def close(self, grace_s: float | None = None) -> None:
        """Stop polling and close the channel; with ``grace_s``, calls still running (a
        draining worker finishing its streams) get that long before they are cancelled."""
        self._closed = True
        tasks = self._tasks + ([self._kv_task] if self._kv_task is not None else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.channel.close(grace=grace_s)

    def mark_failed(self, reason: str) -> None:
        """Called by the request path when an RPC failed in a way that points at the worker."""
        if self.state.healthy:
            log.warning("worker marked unhealthy", extra={"worker": self.address, "reason": reason})
            self.state.healthy = False
            self._changed()

    def _changed(self) -> None:
        if not self.state.healthy:
            # The model forgets what an unhealthy worker held (it may come back empty); drop the
            # feed too, so coming back starts a new subscription, whose snapshot restores the
            # entries that are still true.
            self._stop_kv_feed()
        if self._on_change is not None:
            self._on_change(self)

    def _stop_kv_feed(self) -> None:
        if self._kv_task is not None:
            self._kv_task.cancel()  # applies no further batch: the loop is single-threaded
            self._kv_task = None

    def _check_identity(self, model: str, block_size: int) -> bool:
        """Is this the worker discovery expects? A pod that serves another model or block size
        (a wrong image, a stale pod, a pod posing as a worker) must not get its traffic."""
        problem = None
        if self.expect_model is not None and model not in self.expect_model:
            problem = f"serves model {model!r}, expected one of {sorted(self.expect_model)}"
        elif self.expect_block_size is not None and block_size != self.expect_block_size:
            problem = f"uses block size {block_size}, expected {self.expect_block_size}"
        if problem != self.mismatch:
            self.mismatch = problem
            if problem:
                log.warning(
                    "worker is not what discovery expects", extra={"worker": self.address, "error": problem}
                )
        return problem is None

    async def check_health(self) -> bool:
        reply = await self.stub.Health(pb.HealthRequest(), timeout=self.rpc_timeout_s)
        if reply.worker_id:
            self.state.worker_id = reply.worker_id
        if reply.model:
            self.model_name = reply.model
        if reply.block_size:
            self.block_size = reply.block_size
        identity_ok = self._check_identity(reply.model, reply.block_size)
        return reply.status == pb.HealthResponse.STATUS_SERVING and identity_ok

    async def poll_once(self) -> None:
        """Refresh health and load. A refused connection or a NOT_SERVING/DRAINING answer marks
        the worker unhealthy at once; slow answers only after ``SLOW_POLLS_TO_FAIL`` in a row,
        since a CPU-bound worker in a long prefill can miss one deadline and still be fine."""
        try:
            serving = await self.check_health()
            report = (
                await self.stub.GetLoad(pb.LoadRequest(), timeout=self.rpc_timeout_s) if serving else None
            )
            self._slow_polls = 0
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            slow = isinstance(exc, TimeoutError) or (
                isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            )
            self._slow_polls = self._slow_polls + 1 if slow else SLOW_POLLS_TO_FAIL
            if self._slow_polls < SLOW_POLLS_TO_FAIL:
                return
            if self.state.healthy:
                log.warning("worker health check failed", extra={"worker": self.address, "error": str(exc)})
            serving, report = False, None
        if report is not None:
            self.load.apply_report(report)
        if serving != self.state.healthy:
            log.info("worker health changed", extra={"worker": self.address, "healthy": serving})
            self.state.healthy = serving
            self._changed()
        if serving and self._kv_events is not None and self._kv_task is None and not self._closed:
            # Start the feed once the worker's id is known (the index is keyed by it), and again
            # each time the worker comes back from being unhealthy.
            self._kv_task = asyncio.create_task(self._kv_event_loop(), name=f"kv {self.address}")

    async def _poll_loop(self) -> None:
        while not self._closed:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    async def _kv_event_loop(self) -> None:
        """Follow StreamKvEvents for the worker's lifetime, reconnecting after failures."""
        assert self._kv_events is not None
        backoff = 0.2
        while not self._closed:
            call = None
            try:
                # Each subscription starts with a snapshot (CLEARED + STORED), so after a gap in
                # the sequence the cure is to subscribe again, not to guess what was lost.
                last = 0
                call = self.stub.StreamKvEvents(pb.KvEventsRequest())
                async for batch in call:
                    backoff = 0.2
                    if last and batch.sequence > last + 1:
                        log.warning(
                            "KV events lost; resubscribing",
                            extra={"worker": self.address, "expected": last + 1, "got": batch.sequence},
                        )
                        call.cancel()
                        break
                    last = max(last, batch.sequence)
                    self._kv_events(self.worker_id, batch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker has no KV event stream", extra={"worker": self.address})
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad batch must not kill the feed
                log.exception("KV event feed failed", extra={"worker": self.address})
            finally:
                if call is not None:
                    call.cancel()  # also when this feed is cancelled: the worker drops the stream
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10.0)

    def cancel_soon(self, request_id: str) -> None:
        """Best-effort Cancel RPC that never blocks the caller (used on client disconnect)."""

        async def _cancel() -> None:
            with contextlib.suppress(Exception):
                await self.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=self.rpc_timeout_s)

        task = asyncio.get_running_loop().create_task(_cancel())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()

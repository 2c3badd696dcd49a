"""The worker's gRPC server (``tusk.v1.Worker``) around one ``LLMEngine``.

The engine steps on a dedicated thread so the asyncio loop only moves messages: handlers queue
requests into the engine, and the step thread hands each step's outputs back to the loop with
``call_soon_threadsafe``, where they land in one ``asyncio.Queue`` per request. A handler that
ends early (client gone, RPC cancelled, deadline) aborts its request in the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from tusk.worker.connector import TierConnector
from tusk.worker.engine import InvalidRequest, KvEventRecord, LLMEngine, RequestOutput
from tusk.worker.metrics import WorkerMetrics
from tusk.worker.sequence import FinishReason, SamplingParams

from tusk.config import KVTierConfig, Role, WorkerConfig
from tusk.protocol import pb, rpc

log = logging.getLogger("tusk.worker")

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_MEDIUM = {"device": pb.KV_MEDIUM_DEVICE, "host": pb.KV_MEDIUM_HOST, "tier": pb.KV_MEDIUM_TIER}
_EVENT_QUEUE_BATCHES = 4096
_MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


class _EngineFailed(Exception):
    pass


def sampling_from_proto(sp: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=sp.temperature,
        top_p=sp.top_p if sp.top_p > 0 else 1.0,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else None,
        max_tokens=sp.max_tokens,
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        min_p=sp.min_p,
        min_tokens=sp.min_tokens,
        repetition_penalty=sp.repetition_penalty if sp.repetition_penalty != 0 else 1.0,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
    )


def logprob_to_proto(entry) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        logprob=entry.logprob, top_token_ids=entry.top_ids, top_logprobs=entry.top_logprobs
    )


def served_name(config: WorkerConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model == "tiny" or config.model.startswith("hf://"):
        return config.model.removeprefix("hf://")
    return Path(config.model).expanduser().resolve().name


class WorkerService(rpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, engine: LLMEngine, connector: TierConnector | None) -> None:
        self.config = config
        self.engine = engine
        self.connector = connector
        self.worker_id = config.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.model_name = served_name(config)
        self.metrics = WorkerMetrics(self.worker_id, config.role.value, self.model_name)
        self.metrics.total_blocks.set(engine.num_blocks)
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._event_subscribers: list[_EventSubscriber] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe_tier = None
        self._last_counts = (0, 0, 0, 0, 0)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.connector is not None:
            self._unsubscribe_tier = self.connector.subscribe(self._on_tier_event)
        self._thread = threading.Thread(target=self._step_loop, name="tusk-engine", daemon=True)
        self._thread.start()

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let running requests finish for up to ``timeout`` s, abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.engine.num_live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._queues):
            self.engine.abort(request_id)
        deadline = time.monotonic() + 5
        while self._queues and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self.engine._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._unsubscribe_tier is not None:
            self._unsubscribe_tier()

    # -- the step thread -------------------------------------------------------------------
    def _step_loop(self) -> None:
        assert self._loop is not None
        engine = self.engine
        while not self._stop.is_set():
            engine.wait_for_work(0.1)
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - fail every request instead of hanging them
                log.exception("engine step failed; failing the running requests")
                self._loop.call_soon_threadsafe(self._fail_all, exc)
                time.sleep(0.1)
                continue
            events = engine.drain_kv_events()
            self._observe(len(outputs))  # before delivery: a client that saw a token sees its metrics
            if outputs or events:
                self._loop.call_soon_threadsafe(self._deliver, outputs, events)

    def _observe(self, _n: int) -> None:
        e, m = self.engine, self.metrics
        stats = e.last_stats
        counts = (
            e.num_steps,
            e.num_generated_tokens,
            e.num_prompt_tokens_computed,
            int(stats["cache_hit_tokens"]),
            int(stats["cache_query_tokens"]),
        )
        last = self._last_counts
        if counts[0] != last[0]:
            m.step_seconds.observe(e.last_step_s)
            m.batch_size.observe(e.last_batch_size)
        m.generated_tokens.inc(counts[1] - last[1])
        m.prompt_tokens.inc(counts[2] - last[2])
        m.cache_hit_tokens.inc(counts[3] - last[3])
        m.cache_query_tokens.inc(counts[4] - last[4])
        self._last_counts = counts
        while e.recent_ttfts:
            m.ttft_seconds.observe(e.recent_ttfts.popleft())
        m.free_blocks.set(stats["free_blocks"])
        m.running.set(stats["running"])
        m.waiting.set(stats["waiting"])

    def _deliver(self, outputs: list[RequestOutput], events: list[KvEventRecord]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
            if out.finished and out.finish_reason is not None:
                self.metrics.finished(out.finish_reason.value)
        if events:
            self._publish(
                [
                    pb.KvEvent(kind=_kind(e.stored), medium=_MEDIUM[e.medium], block_hashes=e.block_hashes)
                    for e in events
                ]
            )

    def _fail_all(self, exc: Exception) -> None:
        for request_id, queue in list(self._queues.items()):
            self.engine.abort(request_id)
            queue.put_nowait(_EngineFailed(str(exc)))

    # -- KV events -------------------------------------------------------------------------
    def _on_tier_event(self, event) -> None:
        """Host-cache and tier events; may arrive on any thread."""
        from tusk.kvtier.events import to_proto

        message = to_proto(event)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._publish, [message])  # fine from the loop's thread too
        except RuntimeError:  # loop closed during shutdown
            pass

    def _publish(self, events: list[pb.KvEvent]) -> None:
        for sub in self._event_subscribers:
            sub.push(events)

    # -- RPCs ------------------------------------------------------------------------------
    async def _admit(self, context: grpc.aio.ServicerContext, request_id: str, **kwargs) -> asyncio.Queue:
        if self.draining:
            self.metrics.rejected.inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining; retry on another worker")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        if request_id in self._queues:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request id {request_id!r} is already running"
            )
        self._queues[request_id] = queue
        try:
            self.engine.add_request(request_id, **kwargs)
        except InvalidRequest as exc:
            del self._queues[request_id]
            self.metrics.rejected.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return queue

    @staticmethod
    def _timeout(deadline_unix_s: float) -> float | None:
        return None if deadline_unix_s <= 0 else deadline_unix_s - time.time()

    @classmethod
    def _loop_deadline(cls, deadline_unix_s: float) -> float | None:
        """The request deadline on the event loop's clock, for ``asyncio.timeout_at``."""
        timeout = cls._timeout(deadline_unix_s)
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        queue = await self._admit(
            context,
            request_id,
            prompt=list(request.prompt_token_ids),
            sampling=sampling_from_proto(request.sampling),
            first_token=request.first_token if request.HasField("first_token") else None,
            extra_keys=list(request.hash_extra_keys),
        )
        finished = False
        first = True
        # The deadline guards only the waits for engine output, never the ``yield``: a timeout
        # that fires while this generator is suspended at a yield cancels gRPC's own send in the
        # handler task, where it cannot become DEADLINE_EXCEEDED, and the stream could hang.
        deadline = self._loop_deadline(request.deadline_unix_s)
        try:
            loop = asyncio.get_running_loop()
            while not finished:
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError  # also when output piled up while the client read slowly
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
                batch = [item]
                while not queue.empty():  # coalesce tokens that piled up since the last send
                    batch.append(queue.get_nowait())
                tokens: list[int] = []
                logprobs: list[pb.TokenLogprob] = []
                reason = pb.FINISH_REASON_UNSPECIFIED
                for out in batch:
                    if isinstance(out, Exception):
                        finished = True
                        await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {out}")
                    tokens += out.new_token_ids
                    if out.logprobs:
                        logprobs += [logprob_to_proto(e) for e in out.logprobs]
                    if out.finished:
                        finished = True
                        reason = _FINISH[out.finish_reason or FinishReason.ABORT]
                message = pb.GenerateResponse(token_ids=tokens, finish_reason=reason, logprobs=logprobs)
                if first:
                    message.prompt_tokens = len(request.prompt_token_ids)
                    message.cached_tokens = batch[0].cached_tokens
                    message.queue_s = batch[0].queue_s
                    message.prefill_s = batch[0].prefill_s
                    message.handoff_s = batch[0].handoff_s
                    first = False
                yield message
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request deadline passed")
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        request_id = request.request_id or uuid.uuid4().hex
        queue = await self._admit(
            context,
            request_id,
            prompt=list(request.prompt_token_ids),
            sampling=sampling_from_proto(request.sampling),
            extra_keys=list(request.hash_extra_keys),
            prefill_only=True,
        )
        finished = False
        try:
            async with asyncio.timeout(self._timeout(request.deadline_unix_s)):
                out = await queue.get()
                if isinstance(out, Exception):
                    finished = True
                    await context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {out}")
                finished = out.finished
                in_tier = await self._blocks_in_tier(request_id, out)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request deadline passed")
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
            if self.connector is not None:
                self.connector.finish(request_id, keep=False)  # stop tracking its writes
        if out.finish_reason is FinishReason.ABORT or not out.new_token_ids:
            await context.abort(grpc.StatusCode.ABORTED, "prefill was cancelled")
        reason = pb.FINISH_REASON_UNSPECIFIED if out.finish_reason is None else _FINISH[out.finish_reason]
        return pb.PrefillResponse(
            first_token=out.new_token_ids[0],
            block_hashes=out.block_hashes,
            cached_tokens=out.cached_tokens,
            computed_tokens=out.computed_tokens,
            blocks_in_tier=in_tier,
            finish_reason=reason,
            first_token_logprob=logprob_to_proto(out.logprobs[0]) if out.logprobs else None,
            queue_s=out.queue_s,
            prefill_s=out.prefill_s,
        )

    async def _blocks_in_tier(self, request_id: str, out: RequestOutput) -> int:
        """Leading prompt blocks the decode worker will find in the shared tier."""
        if self.connector is None or not self.config.kv_tier.url or not out.block_hashes:
            return 0
        timeout = self.config.kv_tier.timeout_s
        written = await asyncio.wrap_future(self.connector.flush(request_id, timeout))
        if written >= len(out.block_hashes):
            return len(out.block_hashes)
        # Some blocks were reused rather than written now: ask the tier (one round trip).
        try:
            held = await asyncio.wait_for(self.connector.transfer.contains(out.block_hashes), timeout)
        except Exception:  # noqa: BLE001 - tier trouble: report only what we just wrote
            return 0 if written < len(out.block_hashes) else written
        n = 0
        for hit in held:
            if not hit:
                break
            n += 1
        return n

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(found=self.engine.abort(request.request_id))

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        """The field meanings are LoadReport's (worker.proto); ``LLMEngine.load`` computes them."""
        return pb.LoadReport(worker_id=self.worker_id, role=self.config.role.value, **self.engine.load())

    async def StreamKvEvents(
        self, request: pb.KvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.KvEventBatch]:
        """A snapshot of the device cache (CLEARED then STORED), then every change as it happens."""
        sub = _EventSubscriber()
        loop = asyncio.get_running_loop()
        snapshot: asyncio.Future[list[int]] = loop.create_future()

        def take_snapshot() -> None:
            hashes = self.engine.cached_block_hashes()

            def register() -> None:
                # Registered on the loop right after the snapshot, before any later event lands.
                self._event_subscribers.append(sub)
                if not snapshot.done():
                    snapshot.set_result(hashes)

            loop.call_soon_threadsafe(register)

        self.engine.call_soon(take_snapshot)
        try:
            hashes = await snapshot
            sub.push(
                [
                    pb.KvEvent(kind=pb.KvEvent.KIND_CLEARED, medium=pb.KV_MEDIUM_DEVICE),
                    pb.KvEvent(kind=pb.KvEvent.KIND_STORED, medium=pb.KV_MEDIUM_DEVICE, block_hashes=hashes),
                ],
                front=True,
            )
            while True:
                sequence, events = await sub.get()
                yield pb.KvEventBatch(worker_id=self.worker_id, sequence=sequence, events=events)
        finally:
            if sub in self._event_subscribers:
                self._event_subscribers.remove(sub)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse(
            status=pb.HealthResponse.STATUS_DRAINING if self.draining else pb.HealthResponse.STATUS_SERVING,
            worker_id=self.worker_id,
            role=self.config.role.value,
            model=self.model_name,
            block_size=self.engine.block_size,
            max_model_len=self.engine.max_model_len,
            kv_fingerprint=self.engine.fingerprint.digest(),
            vocab_size=self.engine.spec.vocab_size,
        )

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        folder = self.engine.folder
        files = {name: (folder / name).read_bytes() for name in _MODEL_FILES if (folder / name).is_file()}
        return pb.ModelInfo(
            model=self.model_name,
            block_size=self.engine.block_size,
            max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.spec.vocab_size,
            eos_token_ids=list(self.engine.spec.eos_token_ids),
            files=files,
        )


def _kind(stored: bool) -> int:
    return pb.KvEvent.KIND_STORED if stored else pb.KvEvent.KIND_REMOVED


class _EventSubscriber:
    """One StreamKvEvents client: batches numbered 1, 2, ...; a dropped batch leaves a gap."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[int, list[pb.KvEvent]]] = asyncio.Queue(_EVENT_QUEUE_BATCHES)
        self._sequence = 0

    def push(self, events: list[pb.KvEvent], front: bool = False) -> None:
        self._sequence += 1
        item = (self._sequence, events)
        if front:
            # The snapshot must come first even if events were queued meanwhile.
            pending = []
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            self._queue.put_nowait(item)
            for entry in pending:
                self._queue.put_nowait((entry[0], entry[1]))
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("KV event subscriber is too slow; dropped batch %d", self._sequence)

    async def get(self) -> tuple[int, list[pb.KvEvent]]:
        return await self._queue.get()


# -- running a worker ------------------------------------------------------------------------
class Worker:
    """A running worker: engine + gRPC server + metrics endpoint."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.service: WorkerService | None = None
        self.address = ""
        self.metrics_port: int | None = None
        self.http = None  # WorkerHTTP when config.http_port is set
        self.http_address: str | None = None

    async def start(self) -> str:
        config = self.config
        loop = asyncio.get_running_loop()
        engine = await asyncio.to_thread(
            LLMEngine, config.model, config.engine, config.role, kv_tier=config.kv_tier, loop=loop
        )
        connector = engine.connector if isinstance(engine.connector, TierConnector) else None
        if connector is not None and config.kv_tier.url:
            try:
                await connector.transfer.start_tier_watch()
            except Exception:  # noqa: BLE001 - eviction events are a nicety
                log.warning("could not watch the KV tier for evictions", exc_info=True)
        self.service = WorkerService(config, engine, connector)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ]
        )
        rpc.add_WorkerServicer_to_server(self.service, self.server)
        port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.service.start()
        await self.server.start()
        host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        self.address = f"{host}:{port}"
        if config.metrics_port is not None:
            self.metrics_port = self.service.metrics.serve(config.metrics_port, config.host)
        if config.http_port is not None:
            from tusk.worker.http_api import WorkerHTTP

            self.http = WorkerHTTP(self.service, self.address)
            self.http_address = await self.http.start(config.host, config.http_port)
            await self.http.wait_ready()
        return self.address

    async def stop(self, drain_timeout: float | None = None) -> None:
        if self.service is None or self.server is None:
            return
        await self.service.drain(self.config.drain_timeout_s if drain_timeout is None else drain_timeout)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        self.service.stop()
        connector = self.service.connector
        if connector is not None:
            try:
                await asyncio.wait_for(connector.aclose(), 5)
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("closing the KV connector failed", exc_info=True)


def load_config(argv: list[str] | None) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="tusk worker", description="Run one tusk inference worker (gRPC).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-json", help="WorkerConfig as a JSON string")
    src.add_argument("--config", help="path of a WorkerConfig JSON file")
    args = p.parse_args(argv)
    raw = args.config_json if args.config_json is not None else Path(args.config).read_text()
    return apply_environment(WorkerConfig.model_validate_json(raw))


KV_TIER_URL_ENV = "TUSK_KV_TIER_URL"


def apply_environment(config: WorkerConfig) -> WorkerConfig:
    """Settings that cannot live in a ConfigMap: the operator puts an external tier's URL, with a
    password taken from a Secret, in ``TUSK_KV_TIER_URL``; it wins over the file's URL."""
    url = os.environ.get(KV_TIER_URL_ENV, "").strip()
    if not url:
        return config
    tier = KVTierConfig.model_validate({**config.kv_tier.model_dump(), "url": url})
    return config.model_copy(update={"kv_tier": tier})


async def serve(config: WorkerConfig) -> int:
    worker = Worker(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    assert worker.service is not None
    ready = {
        "event": "ready",
        "address": worker.address,
        "metrics_port": worker.metrics_port,
        "http_address": worker.http_address,
        "worker_id": worker.service.worker_id,
        "role": config.role.value,
        "model": worker.service.model_name,
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", config.drain_timeout_s)
    await worker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(argv)
    except (OSError, ValueError) as exc:
        print(f"tusk worker: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(config))
    except Exception as exc:  # noqa: BLE001 - one readable line, not a traceback, for load errors
        from tusk.worker.loader import ModelLoadError

        if isinstance(exc, ModelLoadError):
            print(f"tusk worker: {exc}", file=sys.stderr)
            return 1
        raise


__all__ = ["KVTierConfig", "Role", "Worker", "WorkerService", "main", "serve"]

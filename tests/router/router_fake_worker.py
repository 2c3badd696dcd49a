"""A test double for router tests: a grpc.aio Worker servicer that speaks the real protocol and
returns a scripted, deterministic token stream instantly (no model). Knobs make it fail in the
ways real workers fail: refuse before the first token, die mid-stream, reject a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tusk.hashing import block_hashes
from tusk.protocol import pb, rpc


@dataclass
class FakeWorkerState:
    script: list[int]
    worker_id: str = "fake"
    role: str = "both"
    model: str = "tiny"
    block_size: int = 16
    token_delay_s: float = 0.0
    chunk_size: int = 1
    fail_before_first: bool = False  # abort every Generate/Prefill with UNAVAILABLE
    die_after_tokens: int | None = None  # stop the whole server after this many streamed tokens
    reject_longer_than: int | None = None  # INVALID_ARGUMENT for longer prompts
    continue_script: bool = False  # a prompt ending in script[:k] continues at script[k] (greedy)
    serving: bool = True
    kv_snapshot: bool = False  # each StreamKvEvents starts with CLEARED + STORED, as real workers do
    prefill_delay_s: float = 0.0
    after_finish: list[int] = field(default_factory=list)  # tokens a buggy worker sends after finishing
    reject_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT  # for reject_longer_than
    stored_hashes: list[int] = field(default_factory=list)
    health_delay_s: float = 0.0
    tokenizer_dir: Path | None = None
    generate_calls: list[pb.GenerateRequest] = field(default_factory=list)
    prefill_calls: list[pb.PrefillRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    aborted_streams: int = 0
    kv_queue: asyncio.Queue[pb.KvEventBatch] = field(default_factory=asyncio.Queue)
    sequence: int = 0
    subscriptions: int = 0


class FakeWorker(rpc.WorkerServicer):
    def __init__(self, state: FakeWorkerState) -> None:
        self.s = state
        self.server: grpc.aio.Server | None = None

    async def _check(self, prompt: list[int], context: grpc.aio.ServicerContext) -> None:
        if self.s.fail_before_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker refuses")
        limit = self.s.reject_longer_than
        if limit is not None and len(prompt) > limit:
            await context.abort(self.s.reject_code, f"prompt longer than {limit} tokens")

    def _stored(self, prompt: list[int]) -> None:
        hashes = block_hashes(prompt, self.s.block_size)
        if hashes:
            self.s.stored_hashes.extend(hashes)
            self.s.sequence += 1
            event = pb.KvEvent(kind=pb.KvEvent.KIND_STORED, medium=pb.KV_MEDIUM_DEVICE, block_hashes=hashes)
            self.s.kv_queue.put_nowait(
                pb.KvEventBatch(worker_id=self.s.worker_id, sequence=self.s.sequence, events=[event])
            )

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        self.s.generate_calls.append(request)
        prompt = list(request.prompt_token_ids)
        await self._check(prompt, context)
        script = self.s.script
        start = 0
        if request.HasField("first_token"):
            if request.first_token != script[0]:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first_token does not match")
            start = 1
        elif self.s.continue_script:
            start = max((k for k in range(len(script) + 1) if k == 0 or prompt[-k:] == script[:k]), default=0)
        budget = request.sampling.max_tokens - start
        out = script[start : start + budget]
        sent = 0
        first = True
        try:
            for i in range(0, max(len(out), 1), self.s.chunk_size):
                ids = out[i : i + self.s.chunk_size]
                if self.s.die_after_tokens is not None and sent >= self.s.die_after_tokens:
                    assert self.server is not None
                    asyncio.get_running_loop().create_task(self.server.stop(None))
                    await asyncio.sleep(10)
                if self.s.token_delay_s:
                    await asyncio.sleep(self.s.token_delay_s)
                sent += len(ids)
                last = i + self.s.chunk_size >= len(out)
                finish = pb.FINISH_REASON_UNSPECIFIED
                if last:
                    finish = pb.FINISH_REASON_LENGTH if len(out) >= budget else pb.FINISH_REASON_STOP
                msg = pb.GenerateResponse(token_ids=ids, finish_reason=finish)
                if first:
                    msg.prompt_tokens = len(prompt)
                    msg.cached_tokens = (
                        0 if start == 0 else (len(prompt) // self.s.block_size) * self.s.block_size
                    )
                    first = False
                yield msg
            if self.s.after_finish:
                yield pb.GenerateResponse(token_ids=self.s.after_finish)
        except asyncio.CancelledError:
            self.s.aborted_streams += 1
            raise
        self._stored(prompt)

    async def Prefill(self, request, context):  # noqa: N802
        self.s.prefill_calls.append(request)
        prompt = list(request.prompt_token_ids)
        await self._check(prompt, context)
        if self.s.prefill_delay_s:
            await asyncio.sleep(self.s.prefill_delay_s)
        hashes = block_hashes(prompt, self.s.block_size)
        self._stored(prompt)
        return pb.PrefillResponse(
            first_token=self.s.script[0],
            block_hashes=hashes,
            cached_tokens=0,
            computed_tokens=len(prompt),
            blocks_in_tier=len(hashes),
        )

    async def Cancel(self, request, context):  # noqa: N802
        self.s.cancels.append(request.request_id)
        return pb.CancelResponse(found=True)

    async def GetLoad(self, request, context):  # noqa: N802
        return pb.LoadReport(
            worker_id=self.s.worker_id, role=self.s.role, free_blocks=1000, total_blocks=1000
        )

    async def StreamKvEvents(self, request, context):  # noqa: N802
        self.s.subscriptions += 1
        if self.s.kv_snapshot:
            yield pb.KvEventBatch(
                worker_id=self.s.worker_id,
                sequence=self.s.sequence,
                events=[
                    pb.KvEvent(kind=pb.KvEvent.KIND_CLEARED, medium=pb.KV_MEDIUM_DEVICE),
                    pb.KvEvent(
                        kind=pb.KvEvent.KIND_STORED,
                        medium=pb.KV_MEDIUM_DEVICE,
                        block_hashes=self.s.stored_hashes,
                    ),
                ],
            )
        while True:
            yield await self.s.kv_queue.get()

    async def Health(self, request, context):  # noqa: N802
        if self.s.health_delay_s:
            await asyncio.sleep(self.s.health_delay_s)
        status = pb.HealthResponse.STATUS_SERVING if self.s.serving else pb.HealthResponse.STATUS_NOT_SERVING
        return pb.HealthResponse(
            status=status,
            worker_id=self.s.worker_id,
            role=self.s.role,
            model=self.s.model,
            block_size=self.s.block_size,
        )

    async def GetModelInfo(self, request, context):  # noqa: N802
        files = {}
        if self.s.tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                path = self.s.tokenizer_dir / name
                if path.exists():
                    files[name] = path.read_bytes()
        return pb.ModelInfo(model=self.s.model, block_size=self.s.block_size, max_model_len=4096, files=files)


async def start_fake_worker(state: FakeWorkerState, port: int = 0) -> tuple[FakeWorker, str]:
    """Start a fake worker on loopback; returns the servicer (``.server`` to stop it) and address."""
    server = grpc.aio.server()
    servicer = FakeWorker(state)
    servicer.server = server
    rpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return servicer, f"127.0.0.1:{bound}"

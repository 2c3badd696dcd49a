"""``tusk emulate``: emulated inference workers that speak the real worker protocol.

One process hosts ``--workers N`` emulated engines (asyncio, one gRPC port and one HTTP port
each). Each speaks ``tusk.v1.Worker`` (Generate, Prefill, Cancel, GetLoad, StreamKvEvents,
Health, GetModelInfo) with real KV events and load reports, so the real ``tusk router`` fronts
them unchanged; and an OpenAI-compatible HTTP API (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``) whose ``usage`` carries
``prompt_tokens_details.cached_tokens``, so other routers (smg, vllm-router) can front the same
engines. Anchors: Dynamo's mocker and llm-d's inference-sim.

Timing comes from a profile (``tusk.router.sim.profile``) and the simulator's own worker model
(``tusk.router.sim.realtime``): prefill throughput and attention cost per chunk, decode step
versus batch size and context, KV capacity in blocks with LRU eviction, continuous batching with
chunked prefill, P/D handoff per block. Generated tokens are one fixed word (the emulator models
time, not text); every request produces exactly ``max_tokens`` tokens. Nothing here imports
torch.

    tusk emulate --workers 8 --profile h100-llama8b --time-scale 0.5 [--token-scale 8]

prints one JSON line ``{"event": "ready", "workers": [{"worker_id", "address", "http_url",
"role"}...], "tokenizer": DIR}`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from tusk.config import Role
from tusk.protocol import pb, rpc

log = logging.getLogger("tusk.emulate")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
OUTPUT_WORD = " the"  # every emulated output token


def default_tokenizer_dir() -> Path:
    """The cl100k tokenizer (the tiny model's, no weights), written once into the tusk cache."""
    from tusk.tiny_model import default_cache_dir, write_cl100k_tokenizer

    folder = default_cache_dir() / "emulated-cl100k"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_cl100k_tokenizer(folder)
    return folder


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> str | None:
    """vLLM's refusal of a request longer than the context, or None when it fits."""
    if prompt_tokens + max_tokens <= max_model_len:
        return None
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion)."
    )


class EmulatedService(rpc.WorkerServicer):
    """The worker gRPC protocol over one ``EmulatedEngine``."""

    def __init__(
        self, engine: Any, model: str, files: dict[str, bytes], max_model_len: int, token: int
    ) -> None:
        self.engine = engine
        self.model = model
        self.files = files
        self.max_model_len = max_model_len
        self.token = token
        self._subscribers: list[tuple[asyncio.Queue, list[int]]] = []
        self._live: dict[str, Any] = {}
        engine.listeners.append(self._on_kv)

    # -- KV events -------------------------------------------------------------------------
    def _on_kv(self, stored: list[int], removed: list[int]) -> None:
        events = []
        if stored:
            events.append(
                pb.KvEvent(kind=pb.KvEvent.KIND_STORED, medium=pb.KV_MEDIUM_DEVICE, block_hashes=stored)
            )
        if removed:
            events.append(
                pb.KvEvent(kind=pb.KvEvent.KIND_REMOVED, medium=pb.KV_MEDIUM_DEVICE, block_hashes=removed)
            )
        for queue, seq in self._subscribers:
            seq[0] += 1
            queue.put_nowait(pb.KvEventBatch(worker_id=self.engine.worker_id, sequence=seq[0], events=events))

    async def StreamKvEvents(
        self, request: pb.KvEventsRequest, context: Any
    ) -> AsyncIterator[pb.KvEventBatch]:
        queue: asyncio.Queue = asyncio.Queue()
        seq = [1]
        snapshot = pb.KvEventBatch(
            worker_id=self.engine.worker_id,
            sequence=1,
            events=[
                pb.KvEvent(kind=pb.KvEvent.KIND_CLEARED, medium=pb.KV_MEDIUM_DEVICE),
                pb.KvEvent(
                    kind=pb.KvEvent.KIND_STORED,
                    medium=pb.KV_MEDIUM_DEVICE,
                    block_hashes=self.engine.cached_hashes(),
                ),
            ],
        )
        entry = (queue, seq)
        self._subscribers.append(entry)
        try:
            yield snapshot
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(entry)

    # -- requests --------------------------------------------------------------------------
    async def _check(self, request: Any, context: Any) -> None:
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        if request.sampling.max_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens must be > 0")
        too_long = context_error(
            len(request.prompt_token_ids), request.sampling.max_tokens, self.max_model_len
        )
        if too_long:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_long)

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        await self._check(request, context)
        ids = list(request.prompt_token_ids)
        max_tokens = request.sampling.max_tokens
        if request.HasField("first_token"):
            live = self.engine.submit_decode(request.request_id, ids, max_tokens)
        else:
            live = self.engine.submit(request.request_id, ids, max_tokens)
        self._live[request.request_id] = live
        first_message = True
        try:
            while True:
                kind, value = await live.events.get()
                if kind == "done":
                    yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH)
                    return
                n = 0 if kind == "admitted" else 1 if kind == "first" else value
                reply = pb.GenerateResponse(token_ids=[self.token] * n)
                if first_message:
                    reply.cached_tokens = live.cached_tokens if live.mode != "decode" else 0
                    reply.prompt_tokens = live.prompt_tokens
                    reply.queue_s, reply.prefill_s, reply.handoff_s = live.timings(self.engine.time_scale)
                    first_message = False
                yield reply
        finally:
            self._live.pop(request.request_id, None)
            if not live.finished:
                self.engine.cancel(live)

    async def Prefill(self, request: pb.PrefillRequest, context: Any) -> pb.PrefillResponse:
        await self._check(request, context)
        live = self.engine.submit(request.request_id, list(request.prompt_token_ids), 1, mode="prefill")
        try:
            while (await live.events.get())[0] != "first":
                pass
        except asyncio.CancelledError:
            self.engine.cancel(live)
            raise
        queue_s, prefill_s, _ = live.timings(self.engine.time_scale)
        return pb.PrefillResponse(
            queue_s=queue_s,
            prefill_s=prefill_s,
            first_token=self.token,
            block_hashes=live.hashes,
            cached_tokens=live.cached_tokens,
            computed_tokens=live.prompt_tokens - live.cached_tokens,
            blocks_in_tier=len(live.hashes),  # the emulated handoff always delivers the KV
            finish_reason=pb.FINISH_REASON_LENGTH if request.sampling.max_tokens <= 1 else 0,
        )

    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        live = self._live.pop(request.request_id, None)
        if live is not None:
            self.engine.cancel(live)
        return pb.CancelResponse(found=live is not None)

    async def GetLoad(self, request: pb.LoadRequest, context: Any) -> pb.LoadReport:
        r = self.engine.load_report()
        return pb.LoadReport(
            worker_id=self.engine.worker_id,
            role=self.engine.role.value,
            running_requests=r.running_requests,
            queued_requests=r.queued_requests,
            queued_prefill_tokens=r.queued_prefill_tokens,
            free_blocks=r.free_blocks,
            total_blocks=r.total_blocks,
            cache_hit_tokens=self.engine.cache_hit_tokens,
            cache_query_tokens=self.engine.cache_query_tokens,
            prefill_tokens_per_s=r.prefill_tokens_per_s,
            decode_step_s=r.decode_step_s,
        )

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        return pb.HealthResponse(
            status=pb.HealthResponse.STATUS_SERVING,
            worker_id=self.engine.worker_id,
            role=self.engine.role.value,
            model=self.model,
            block_size=self.engine.block_size,
            max_model_len=self.max_model_len,
            kv_fingerprint=f"emulated-{self.engine.profile.name}",
            vocab_size=100352,
        )

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: Any) -> pb.ModelInfo:
        return pb.ModelInfo(
            model=self.model,
            block_size=self.engine.block_size,
            max_model_len=self.max_model_len,
            vocab_size=100352,
            files=self.files,
        )


# -- the OpenAI-compatible HTTP API --------------------------------------------------------
def build_http_app(by_port: dict[int, EmulatedService], tokenizer: Any, model: str) -> Any:
    """One Starlette app for every emulated worker: the listening port picks the worker."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": message, "type": "invalid_request_error", "code": status}},
            status_code=status,
        )

    def service_of(request: Request) -> EmulatedService:
        return by_port[request.scope["server"][1]]

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "tusk"}]}
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> JSONResponse:
        svc = service_of(request)
        return JSONResponse(
            {"model_path": model, "served_model_name": model, "max_model_len": svc.max_model_len}
        )

    async def complete(request: Request) -> Any:
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return error(400, "messages must be a non-empty list")
            # the emulator models time, not text: contents joined in order stand for the prompt
            prompt: Any = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        else:
            prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            return error(400, "prompt must be a non-empty string or list of token ids")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, "max_tokens must be a positive integer")
        svc = service_of(request)
        too_long = context_error(len(ids), max_tokens, svc.max_model_len)
        if too_long:
            return error(400, too_long)
        engine = svc.engine
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        live = engine.submit(rid, ids, max_tokens)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, Any]:
            return {
                "prompt_tokens": live.prompt_tokens,
                "completion_tokens": live.sent,
                "total_tokens": live.prompt_tokens + live.sent,
                "prompt_tokens_details": {"cached_tokens": live.cached_tokens},
            }

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        if not body.get("stream"):
            try:
                while (await live.events.get())[0] != "done":
                    pass
            except asyncio.CancelledError:
                engine.cancel(live)
                raise
            text = OUTPUT_WORD * live.sent
            c = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [c],
                    "usage": usage(),
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    kind, value = await live.events.get()
                    if kind == "done":
                        break
                    if kind == "admitted":
                        continue
                    n = 1 if kind == "first" else value
                    data = {"id": rid, "object": chunk_obj, "created": created, "model": model}
                    data["choices"] = [choice(OUTPUT_WORD * n, None)]
                    yield f"data: {json.dumps(data)}\n\n".encode()
                end = {"id": rid, "object": chunk_obj, "created": created, "model": model}
                end["choices"] = [choice("", "length")]
                if include_usage:
                    end["usage"] = usage()
                yield f"data: {json.dumps(end)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                if not live.finished:
                    engine.cancel(live)

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/completions", complete, methods=["POST"]),
            Route("/v1/chat/completions", complete, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/health_generate", health, methods=["GET"]),
            Route("/get_model_info", info, methods=["GET"]),
            Route("/get_server_info", info, methods=["GET"]),
        ]
    )


def _listen(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small SSE chunks must not wait
    sock.bind((host, 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Emulator:
    """N emulated workers in this process: gRPC servers, one HTTP server, shared tokenizer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engines: list[Any] = []
        self.servers: list[grpc.aio.Server] = []
        self.workers: list[dict[str, Any]] = []
        self.http: Any = None
        self._http_task: asyncio.Task | None = None

    async def start(self) -> dict[str, Any]:
        from tokenizers import Tokenizer

        from tusk.router.sim.profile import load_profile
        from tusk.router.sim.realtime import EmulatedEngine

        a = self.args
        profile = load_profile(a.profile).scaled(a.token_scale).validate()
        folder = Path(a.tokenizer) if a.tokenizer else default_tokenizer_dir()
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        if "tokenizer.json" not in files:
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
        token = tokenizer.encode(OUTPUT_WORD, add_special_tokens=False).ids[0]
        roles = (
            [Role.PREFILL] * a.prefill + [Role.DECODE] * a.decode
            if (a.prefill or a.decode)
            else [Role(a.role)] * a.workers
        )
        by_port: dict[int, EmulatedService] = {}
        sockets = []
        loop = asyncio.get_running_loop()
        for i, role in enumerate(roles):
            engine = EmulatedEngine(
                f"emu-{i:03d}-{role.value}",
                role,
                profile,
                a.block_size,
                time_scale=a.time_scale,
                stream_interval_s=a.stream_interval,
                index=i,
            )
            engine.start(loop)
            limit = min(a.max_model_len or (1 << 62), profile.max_model_len(a.block_size))
            service = EmulatedService(engine, a.model_name, files, limit, token)
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
            rpc.add_WorkerServicer_to_server(service, server)
            port = server.add_insecure_port(f"{a.host}:0")
            await server.start()
            self.engines.append(engine)
            self.servers.append(server)
            entry = {"worker_id": engine.worker_id, "address": f"{a.host}:{port}", "role": role.value}
            if not a.no_http:
                sock = _listen(a.host)
                http_port = sock.getsockname()[1]
                by_port[http_port] = service
                sockets.append(sock)
                entry["http_url"] = f"http://{a.host}:{http_port}"
            self.workers.append(entry)
        if sockets:
            import uvicorn

            class _Server(uvicorn.Server):
                @contextlib.contextmanager
                def capture_signals(self):  # the emulator handles signals itself
                    yield

            config = uvicorn.Config(
                build_http_app(by_port, tokenizer, a.model_name),
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=30,
            )
            self.http = _Server(config)
            self._http_task = asyncio.create_task(self.http.serve(sockets=sockets))
            while not self.http.started:
                if self._http_task.done():
                    self._http_task.result()
                await asyncio.sleep(0.01)
        return {
            "event": "ready",
            "workers": self.workers,
            "tokenizer": str(folder),
            "model": a.model_name,
            "profile": profile.name,
            "block_size": a.block_size,
            "time_scale": a.time_scale,
            "token_scale": a.token_scale,
        }

    async def stop(self) -> None:
        if self.http is not None:
            self.http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 5)
        for server in self.servers:
            await server.stop(grace=0.5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tusk emulate", description="Emulated inference workers (no model, no torch)."
    )
    p.add_argument("--workers", type=int, default=1, help="role=--role workers (aggregated)")
    p.add_argument("--role", choices=[r.value for r in Role], default="both")
    p.add_argument("--prefill", type=int, default=0, help="prefill-role workers (with --decode)")
    p.add_argument("--decode", type=int, default=0, help="decode-role workers (with --prefill)")
    p.add_argument("--profile", default="h100-llama8b", help="h100-llama8b, cpu-tusk-tiny or a JSON file")
    p.add_argument("--time-scale", type=float, default=1.0, help="emulated seconds per wall second")
    p.add_argument("--token-scale", type=int, default=1, help="one prompt token stands for this many")
    p.add_argument("--block-size", type=int, default=64, help="KV block size in tokens (the router's)")
    p.add_argument("--model-name", default="emulated")
    p.add_argument(
        "--max-model-len", type=int, default=0, help="prompt + max_tokens limit (default: the KV capacity)"
    )
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: cl100k, built once)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--stream-interval", type=float, default=0.05, help="wall seconds between token batches")
    p.add_argument("--no-http", action="store_true", help="gRPC only")
    return p


def validate(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    total = args.prefill + args.decode if (args.prefill or args.decode) else args.workers
    if args.prefill < 0 or args.decode < 0 or (args.prefill and not args.decode):
        p.error("--prefill needs --decode >= 1")
    if not 1 <= total <= 512:
        p.error(f"1..512 workers, got {total}")
    if args.max_model_len < 0:
        p.error("--max-model-len must be >= 0 (0: the KV capacity)")
    if not args.time_scale > 0 or args.token_scale < 1 or args.block_size < 1 or args.stream_interval <= 0:
        p.error("--time-scale and --stream-interval must be > 0, --token-scale and --block-size >= 1")


async def _serve(args: argparse.Namespace) -> int:
    emulator = Emulator(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        ready = await emulator.start()
    except (ValueError, OSError) as exc:
        print(f"tusk emulate: {exc}", file=sys.stderr)
        await emulator.stop()
        return 2
    print(json.dumps(ready), flush=True)
    await stop.wait()
    await emulator.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    validate(args, p)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        from tusk.router.sim.profile import load_profile

        load_profile(args.profile).scaled(args.token_scale).validate()  # refuse before binding anything
    except ValueError as exc:
        print(f"tusk emulate: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible HTTP handlers.

Order of checks on a generation request, cheapest and most client-facing first: auth (401),
body size (413), admission (429), JSON and schema (400), model (404), ready workers (503),
prompt length (400). Streaming responses wait for the first token before sending the HTTP status,
so any failure before it (no worker, a worker's INVALID_ARGUMENT, every retry exhausted) is a
proper HTTP error, and only failures after it become an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from tusk.router import choices
from tusk.router.auth import ApiKeys
from tusk.router.dispatch import Generation, GenerationRequest
from tusk.router.errors import APIError, bad_request, no_worker, overloaded, worker_failed
from tusk.router.logs import request_id_var
from tusk.router.metrics import CONTENT_TYPE, RouterMetrics
from tusk.router.registry import ModelRegistry, ModelRuntime
from tusk.router.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from tusk.router.stops import StopMatcher
from tusk.router.token_cache import prompt_block_hashes, segment_encoder
from tusk.router.tokenizer import ModelTokenizer

from tusk.config import RouterConfig
from tusk.protocol import pb

log = logging.getLogger("tusk.router.api")

POLICY_HEADER = "x-tusk-policy"
SESSION_HEADER = "x-tusk-session"
INLINE_ENCODE_CHARS = 8192
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, media_type="application/json")


def _sse(body: Any) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Prepared:
    """A validated request, tokenized and ready to dispatch."""

    kind: str  # "chat" or "completion"
    body: ChatCompletionRequest | CompletionRequest
    runtime: ModelRuntime
    generation: Generation
    stops: list[str]
    # Choices 1..n-1 when the request asked for n > 1 (``generation`` is choice 0).
    more: list[Generation] = dataclasses.field(default_factory=list)

    @property
    def generations(self) -> list[Generation]:
        return [self.generation, *self.more]


class RouterAPI:
    def __init__(self, config: RouterConfig, registry: ModelRegistry, metrics: RouterMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.keys = ApiKeys(config.api_keys)
        self.inflight = 0
        self.draining = False

    # -- simple endpoints ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Readiness: 200 when some model can serve (a healthy worker that decodes; prefill-only
        workers cannot finish a request). One model without workers (scaled to zero, rolling
        out) must not take the router, and every other model with it, out of its Service."""
        models = {name: rt.can_serve() for name, rt in self.registry.models.items()}
        ready = any(models.values()) and not self.draining
        body = {
            "status": "ok" if ready else "unavailable",
            "models": {
                n: {"ready_workers": len(self.registry.models[n].ready_states()), "can_serve": ok}
                for n, ok in models.items()
            },
        }
        return _json(body, 200 if ready else 503)

    async def live(self, request: Request) -> Response:
        """Liveness: the process serves HTTP, whatever its workers do."""
        return _json({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        for runtime in self.registry.models.values():
            runtime.refresh_metrics()
        self.metrics.queue_depth.set(self.inflight)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        rid = self._request_id(request)
        try:
            self.keys.check(request.headers.get("authorization"))
        except APIError as exc:
            return exc.response(rid)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "tusk"}
            for name in self.registry.public_names()
        ]
        return _json({"object": "list", "data": data}, headers={"x-request-id": rid})

    # -- generation ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    def _request_id(self, request: Request) -> str:
        incoming = request.headers.get("x-request-id")
        if incoming and _REQUEST_ID.match(incoming):
            return incoming
        return f"req-{uuid.uuid4().hex}"

    async def _generate(self, request: Request, kind: str) -> Response:
        started = time.perf_counter()
        rid = self._request_id(request)
        request_id_var.set(rid)
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        admitted = False
        model = "unknown"
        try:
            self.keys.check(request.headers.get("authorization"))
            raw = await self._read_body(request)
            if self.draining:
                raise APIError(
                    503, "The router is shutting down.", type="service_unavailable", code="draining"
                )
            if self.inflight >= self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise overloaded()
            self.inflight += 1
            admitted = True
            from tusk.router.http_backend import maybe_proxy  # imported here: it imports this module

            proxied = await maybe_proxy(self, request, raw, kind)  # models on OpenAI HTTP servers
            if proxied is not None:
                admitted = False  # the proxy releases the slot when its response ends
                return proxied
            prepared = await self._prepare(request, raw, kind, rid)
            model = prepared.runtime.name
            if prepared.body.stream:
                response = await self._stream(prepared, rid, started, endpoint, request)
                admitted = False  # the stream releases its slot when it ends
                return response
            return await self._complete(request, prepared, rid, started, endpoint)
        except APIError as exc:
            if not isinstance(exc, _handled):
                self.metrics.requests.labels(model, endpoint, str(exc.status)).inc()
            if exc.status >= 500:
                log.warning(
                    "request failed", extra={"status": exc.status, "error": exc.message, "model": model}
                )
            return exc.response(rid)
        finally:
            if admitted:
                self.inflight -= 1

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(499, "The client closed the connection.", code="client_closed") from None
        return b"".join(chunks)

    async def _prepare(self, request: Request, raw: bytes, kind: str, rid: str) -> Prepared:
        body: ChatCompletionRequest | CompletionRequest
        if kind == "chat":
            body = parse_body(ChatCompletionRequest, raw)
        else:
            body = parse_body(CompletionRequest, raw)
        runtime = self.registry.get(body.model)
        if not runtime.can_serve():
            raise no_worker(body.model)
        tok = runtime.tokenizer
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt_ids = await _encode(tok, tok.render_chat(messages), special=False)
        elif isinstance(body.prompt, str):
            prompt_ids = await _encode(tok, body.prompt, special=True)
        else:
            prompt_ids = list(body.prompt)  # type: ignore[arg-type]
            vocab = tok.tokenizer.get_vocab_size(with_added_tokens=True)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            raise bad_request("The prompt is empty after tokenization.", param="prompt")
        max_tokens = self._max_tokens(runtime, body, len(prompt_ids))
        sampling = pb.SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),  # vLLM's -1 and 0 both mean "off"
            max_tokens=max_tokens,
            stop_token_ids=[] if body.ignore_eos else tok.eos_token_ids,
            ignore_eos=body.ignore_eos,
            min_p=body.min_p or 0.0,
            min_tokens=body.min_tokens or 0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
        )
        if body.seed is not None:
            sampling.seed = body.seed
        if body.top_logprobs_count() is not None:
            sampling.logprobs = body.top_logprobs_count()
        chosen = request.headers.get(POLICY_HEADER) if runtime.routing.allow_policy_header else None
        policy = runtime.policy(chosen)
        timeout = self.config.request_timeout_s
        gen_request = GenerationRequest(
            # Clients may reuse their own ids; workers key state (and Cancel) on this one.
            request_id=rid if rid.startswith("req-") else f"{rid}-{uuid.uuid4().hex[:8]}",
            prompt_ids=prompt_ids,
            block_hashes=await prompt_block_hashes(prompt_ids, runtime.block_size),
            sampling=sampling,
            policy=policy,
            deadline=time.monotonic() + timeout,
            timeout_s=timeout,
            session_key=request.headers.get(SESSION_HEADER) or body.user,
        )
        generation = Generation(runtime, gen_request)
        more = []
        for i in range(1, body.choices()):
            child = pb.SamplingParams()
            child.CopyFrom(sampling)
            if body.seed is not None:  # vLLM's parallel sampling: child i gets seed + i
                child.seed = (body.seed + i) % 2**64
            more.append(
                Generation(
                    runtime,
                    dataclasses.replace(
                        gen_request, request_id=f"{gen_request.request_id}-{i}", sampling=child
                    ),
                )
            )
        return Prepared(kind, body, runtime, generation, body.stop_strings(), more)

    def _max_tokens(self, runtime: ModelRuntime, body: Any, prompt_len: int) -> int:
        limit = runtime.max_model_len
        asked = body.output_limit()
        if limit is None:
            return asked or 256
        room = limit - prompt_len
        if room <= 0:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens; the prompt has {prompt_len}.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if asked is not None and asked > room:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. You requested {prompt_len + asked} "
                f"tokens ({prompt_len} in the prompt, {asked} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked or room

    # -- text from tokens ------------------------------------------------------------------------

    async def _text_events(
        self, prepared: Prepared, gen: Generation | None = None
    ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason) pairs of one choice; the last one carries the reason."""
        gen = gen or prepared.generation
        detok = prepared.runtime.tokenizer.detokenizer()
        # vLLM checks stop strings only once min_tokens outputs exist (text before that passes).
        min_tokens = gen.req.sampling.min_tokens
        stops = StopMatcher(prepared.stops if not min_tokens else [])
        itl = self.metrics.for_model(prepared.runtime.name).itl
        last = None
        async with contextlib.aclosing(gen.stream()) as chunks:
            async for ids in chunks:
                now = time.perf_counter()
                if last is not None:
                    itl.observe(now - last)
                last = now
                if min_tokens and not stops.stops and gen.completion_tokens >= min_tokens:
                    stops.stops = prepared.stops
                text = stops.feed(detok.push(ids))
                if stops.stopped:
                    yield text, "stop"
                    return  # closing the stream cancels the worker's request
                if text:
                    yield text, None
        if gen.finish_reason == "abort":
            raise worker_failed("the worker aborted the request (draining or cancelled)")
        text = stops.feed(detok.flush())
        if stops.stopped:
            yield text, "stop"
            return
        yield text + stops.flush(), gen.finish_reason or "stop"

    def _usage(self, prepared: Prepared) -> dict[str, Any]:
        return choices.usage(prepared.generations)

    def _finish_metrics(self, prepared: Prepared, endpoint: str, status: int, started: float) -> None:
        gen, model = prepared.generation, prepared.runtime.name
        m = self.metrics.for_model(model)
        m.request(endpoint, status)
        m.e2e.observe(time.perf_counter() - started)
        if gen.ttft_s is not None:
            m.ttft.observe(gen.ttft_s)
        m.prompt_tokens.inc(len(gen.req.prompt_ids))
        m.cached_tokens.inc(gen.cached_tokens)
        m.completion_tokens.inc(sum(g.completion_tokens for g in prepared.generations))
        if gen.attempts > 1:
            m.retries.inc(gen.attempts - 1)
        d = gen.decision
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "request done",
            extra={
                "model": model,
                "status": status,
                "prompt_tokens": len(gen.req.prompt_ids),
                "completion_tokens": gen.completion_tokens,
                "cached_tokens": gen.cached_tokens,
                "ttft_s": gen.ttft_s,
                "e2e_s": round(time.perf_counter() - started, 6),
                "decode_worker": d.decode.address if d else None,
                "prefill_worker": d.prefill.address if d and d.prefill else None,
                "route_reason": d.reason if d else None,
            },
        )

    async def _collect(self, prepared: Prepared) -> list[tuple[str, str | None]]:
        """(text, finish reason) of every choice."""
        parts: list[list[str]] = [[] for _ in prepared.generations]
        reasons: list[str | None] = [None] * len(parts)
        sources = [self._text_events(prepared, g) for g in prepared.generations]
        async with contextlib.aclosing(choices.merge(sources)) as events:
            async for index, text, finish in events:
                parts[index].append(text)
                reasons[index] = finish or reasons[index]
        return [("".join(p), r) for p, r in zip(parts, reasons, strict=True)]

    def _logprobs(self, prepared: Prepared, entries: list, offset: int = 0) -> dict[str, Any] | None:
        if prepared.body.top_logprobs_count() is None:
            return None
        tok = prepared.runtime.tokenizer
        if prepared.kind == "chat":
            return choices.chat_logprobs(tok, entries)
        return choices.completion_logprobs(tok, entries, offset)

    async def _complete(
        self, request: Request, prepared: Prepared, rid: str, started: float, endpoint: str
    ) -> Response:
        # Nothing reads the connection while a non-streamed answer is computed, so watch it: a
        # client that hung up must not keep a worker busy until max_tokens.
        collect = asyncio.ensure_future(self._collect(prepared))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():
            collect.cancel()  # closing the generation cancels the worker's request
            with contextlib.suppress(asyncio.CancelledError, APIError):
                await collect
            self._finish_metrics(prepared, endpoint, 499, started)
            return Response(status_code=499)
        try:
            results = collect.result()
        except APIError as exc:
            self._finish_metrics(prepared, endpoint, exc.status, started)
            raise _handled(exc) from None
        self._finish_metrics(prepared, endpoint, 200, started)
        created = int(time.time())
        if prepared.kind == "chat":
            body = {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": created,
                "model": prepared.runtime.name,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": self._logprobs(prepared, gen.logprobs),
                        "finish_reason": reason,
                    }
                    for i, ((text, reason), gen) in enumerate(zip(results, prepared.generations, strict=True))
                ],
                "usage": self._usage(prepared),
            }
        else:
            body = {
                "id": f"cmpl-{rid}",
                "object": "text_completion",
                "created": created,
                "model": prepared.runtime.name,
                "choices": [
                    {
                        "index": i,
                        "text": text,
                        "logprobs": self._logprobs(prepared, gen.logprobs),
                        "finish_reason": reason,
                    }
                    for i, ((text, reason), gen) in enumerate(zip(results, prepared.generations, strict=True))
                ],
                "usage": self._usage(prepared),
            }
        return _json(body, headers={"x-request-id": rid})

    async def _stream(
        self, prepared: Prepared, rid: str, started: float, endpoint: str, request: Request
    ) -> Response:
        events = choices.merge([self._text_events(prepared, g) for g in prepared.generations])
        try:
            # Failures before the first token are plain HTTP errors; a client that hangs up
            # before it cancels the prefill at once (closing the events cancels the worker call).
            first = await _first_unless_disconnected(request, events)
        except _ClientGone:
            await events.aclose()
            self._finish_metrics(prepared, endpoint, 499, started)
            raise _handled(APIError(499, "The client closed the connection.", code="client_closed")) from None
        except StopAsyncIteration:
            first = (0, "", "stop")
        except APIError as exc:
            await events.aclose()
            self._finish_metrics(prepared, endpoint, exc.status, started)
            raise _handled(exc) from None
        chat = prepared.kind == "chat"
        created = int(time.time())
        base = {
            "id": f"chatcmpl-{rid}" if chat else f"cmpl-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": prepared.runtime.name,
        }
        include_usage = prepared.body.include_usage()
        options = prepared.body.stream_options
        continuous = bool(options and options.continuous_usage_stats)
        cursor = choices.LogprobCursor(prepared.generations)
        offsets = [0] * len(prepared.generations)  # text sent per choice (completions' text_offset)

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> bytes:
            logprobs = None if role else self._logprobs(prepared, cursor.take(index), offsets[index])
            offsets[index] += len(text or "")
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {**base, "choices": [choice]}
            if include_usage or continuous:
                body["usage"] = self._usage(prepared) if continuous else None
            return _sse(body)

        finished = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal finished
            status = 200
            try:
                if chat:
                    for i in range(len(prepared.generations)):
                        yield chunk(i, "", None, role=True)
                unfinished = len(prepared.generations)
                index, text, finish = first
                if text or finish is None:
                    yield chunk(index, text, None)
                while True:
                    if finish is not None:
                        yield chunk(index, None if chat else "", finish)
                        unfinished -= 1
                        if not unfinished:
                            break
                    index, text, finish = await anext(events)
                    if text:
                        yield chunk(index, text, None)
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": self._usage(prepared)})
            except APIError as exc:
                status = exc.status
                yield _sse(exc.body())
            except Exception:  # a bug must still end the stream in a way clients understand
                log.exception("stream failed")
                status = 500
                yield _sse(APIError(500, "Internal server error.", type="server_error").body())
            yield b"data: [DONE]\n\n"
            finished = True
            self._finish_metrics(prepared, endpoint, status, started)

        async def on_close() -> None:
            await events.aclose()  # cancels the worker's request if it is still running
            self.inflight -= 1
            if not finished:  # the client went away mid-stream
                self._finish_metrics(prepared, endpoint, 499, started)

        return _Stream(body(), on_close, headers={"x-request-id": rid, "cache-control": "no-cache"})


class _Stream(StreamingResponse):
    """A streaming response that always runs its cleanup, even when the client vanished before
    the body started (a never-started generator's ``finally`` would not run)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close
        self._iterator = content

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self._iterator.aclose()  # type: ignore[attr-defined]
            await self._on_close()


class _handled(APIError):
    """An APIError whose metrics were already counted."""

    def __init__(self, exc: APIError) -> None:
        super().__init__(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
        )


class _ClientGone(Exception):
    pass


async def _first_unless_disconnected(request: Request, events: AsyncIterator[Any]) -> Any:
    """The first item of ``events``, or ``_ClientGone`` as soon as the client hangs up first."""

    async def first() -> Any:
        return await anext(events)

    item = asyncio.ensure_future(first())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((item, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        item.cancel()
        raise
    finally:
        hung_up = gone.done() and not gone.cancelled()
        gone.cancel()
    if hung_up or not item.done():
        item.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await item
        raise _ClientGone
    return item.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _encode(tok: ModelTokenizer, text: str, *, special: bool) -> list[int]:
    """Long prompts are encoded on a thread (``tokenizers`` releases the GIL), so a 100k-token
    prompt does not stall every other stream for a few hundred milliseconds. A rendered chat
    (``special`` false) goes through the segment cache: its history is tokenized once."""
    if not special:
        return await segment_encoder(tok, tok.tokenizer).encode_async(text, INLINE_ENCODE_CHARS)
    if len(text) < INLINE_ENCODE_CHARS:
        return tok.encode(text, add_special_tokens=special)
    return await asyncio.to_thread(tok.encode, text, add_special_tokens=special)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")

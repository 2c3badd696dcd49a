"""The request path: route, prefill (maybe), decode, retry, cancel, give feedback.

A ``Generation`` turns one tokenized prompt into a stream of token-id chunks. It asks the model's
policy for a decision; with a prefill worker it calls Prefill, hands the first token out at once
and continues with Generate(first_token) on the decode worker, which pulls the prompt's blocks
from the KV tier; without one the decode worker does everything (aggregated). Until the client
has seen a token from a given stage, a failed worker is simply replaced by another one, so a
crash before the first token is invisible to the client. After the request, the policy gets a
``RequestOutcome`` so learning policies (``cost``) can tune themselves.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from tusk.router.admission import QueueFull
from tusk.router.errors import bad_request, no_worker, overloaded, timed_out, worker_failed
from tusk.router.failures import MAX_ATTEMPTS, MAX_SUSPECT, Failure, classify, is_request_error
from tusk.router.load_account import LoadTicket, open_ticket
from tusk.router.policies.base import (
    NoWorkerAvailable,
    Policy,
    RequestOutcome,
    RoutingDecision,
    RoutingRequest,
    WorkerState,
)
from tusk.router.registry import ModelRuntime
from tusk.router.workers import WorkerClient

from tusk.protocol import pb

log = logging.getLogger("tusk.router.dispatch")

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    block_hashes: list[int]
    sampling: pb.SamplingParams
    policy: Policy
    deadline: float  # time.monotonic() seconds
    timeout_s: float
    session_key: str | None = None


@dataclass
class Generation:
    """State of one request on the worker side; iterate ``stream()`` for token chunks."""

    runtime: ModelRuntime
    req: GenerationRequest
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    decision: RoutingDecision | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    handoff_s: float | None = None  # split requests: the KV handoff, as the decode worker measured it
    attempts: int = 0
    suspects: int = 0  # worker connections that broke while holding this request
    # (token id, its logprobs) per sampled token, when the request asked for logprobs.
    logprobs: list[tuple[int, pb.TokenLogprob]] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)
    _active: tuple[WorkerClient, grpc.aio.Call] | None = None
    _excluded: set[str] = field(default_factory=set)
    _ok: bool = False
    _ticket: LoadTicket | None = None  # what this request charged to the router's load account

    # -- routing -------------------------------------------------------------------------------

    def _candidates(self) -> list[WorkerState]:
        return [w for w in self.runtime.ready_states() if w.address not in self._excluded]

    async def _admit(self) -> RoutingDecision | None:
        """Wait in the model's admission queue while every worker is busy (see admission.py).
        Returns the decision made when the queue released the request, or None: route now."""
        gate = self.runtime.admission
        if not gate.queue.enabled:
            return None
        req = self.req
        rt = self.runtime

        def work() -> float:
            return gate.queue.work_s(rt.index, req.block_hashes, len(req.prompt_ids), rt.block_size)

        try:
            decision = await gate.enter(work, self._remaining(), self._route)
        except QueueFull:
            self.runtime.metrics.rejected.labels("queue_full").inc()
            raise overloaded() from None
        except TimeoutError:
            raise timed_out(req.timeout_s) from None
        if decision is not None:
            self.runtime.metrics.admission_held.labels(self.runtime.name).inc()
        return decision

    def _route(self) -> RoutingDecision:
        req = self.req
        workers = self._candidates()
        if not workers:
            raise no_worker(self.runtime.name)
        routing = RoutingRequest(
            request_id=req.request_id,
            block_hashes=req.block_hashes,
            prompt_tokens=len(req.prompt_ids),
            block_size=self.runtime.block_size,
            session_key=req.session_key,
            max_tokens=req.sampling.max_tokens,
        )
        try:
            decision = req.policy.route(routing, workers)
        except NoWorkerAvailable:
            raise no_worker(self.runtime.name) from None
        self.runtime.metrics.routing_decision(self.runtime.name, req.policy.name, decision)
        self._charge(decision)
        if not self.runtime.routing.kv_events:  # approximate mode: assume the chosen workers cache it
            index = self.runtime.index
            index.record_route(decision.decode.worker_id, req.block_hashes)
            if decision.prefill is not None:
                index.record_route(decision.prefill.worker_id, req.block_hashes)
        return decision

    def _charge(self, decision: RoutingDecision) -> None:
        """Move this request's charge in the router's load account to the new decision."""
        if self._ticket is not None:
            self._ticket.done()
        loads = {}
        for w in (decision.decode, decision.prefill):
            if w is not None and w.address in self.runtime.clients:
                loads[w.worker_id] = self.runtime.client(w.address).load
        if len(loads) == (1 if decision.prefill is None or decision.prefill is decision.decode else 2):
            self._ticket = open_ticket(
                loads,
                decision,
                len(self.req.prompt_ids),
                self.req.sampling.max_tokens,
                self.runtime.block_size,
            )

    def _pick_decode(self) -> WorkerState:
        """A replacement decode worker after the chosen one failed: the least loaded one."""
        states = [w for w in self._candidates() if w.can_decode]
        if not states:
            raise no_worker(self.runtime.name)
        return min(states, key=lambda w: (w.inflight + w.running_requests + w.queued_requests, w.address))

    def _remaining(self) -> float:
        left = self.req.deadline - time.monotonic()
        if left <= 0:
            raise timed_out(self.req.timeout_s)
        return left

    def _fail(self, client: WorkerClient, exc: grpc.aio.AioRpcError) -> None:
        self._excluded.add(client.address)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            client.mark_failed(exc.details() or "unavailable")
        log.warning(
            "worker failed; trying another",
            extra={"worker": client.address, "code": exc.code().name, "request_id": self.req.request_id},
        )

    # -- the stream ----------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[list[int]]:
        """Yield token-id chunks; sets finish_reason, cached_tokens and timing as it goes."""
        try:
            async with contextlib.aclosing(self._stream()) as chunks:
                async for chunk in chunks:
                    yield chunk
            self._ok = True
        finally:
            self._cancel_active()
            if self._ticket is not None:
                self._ticket.done()
            self._observe()

    async def _stream(self) -> AsyncIterator[list[int]]:
        first_token: int | None = None
        decode: WorkerState | None = None
        self.attempts = 1  # tries started; each failure starts the next one
        admitted = await self._admit()  # routed as it left the admission queue, if it waited
        while first_token is None:
            decision = admitted or self._route()
            admitted = None
            self.decision = decision
            if decision.prefill is None:
                decode = decision.decode
                break
            prefill_client = self.runtime.client(decision.prefill.address)
            try:
                reply = await self._prefill(prefill_client, decision.prefill)
            except grpc.aio.AioRpcError as exc:
                self.attempts += 1
                self._raise_if_final(exc)
                self._fail(prefill_client, exc)
                continue
            first_token = reply.first_token
            if reply.HasField("first_token_logprob"):
                self.logprobs.append((reply.first_token, reply.first_token_logprob))
            if reply.prefill_s > 0:  # the worker's own measure: compute only, queueing excluded
                self.prefill_s = reply.prefill_s
            if self._ticket is not None:
                self._ticket.first_token()
            self.cached_tokens = reply.cached_tokens
            self.completion_tokens = 1
            self.ttft_s = time.perf_counter() - self._started
            yield [reply.first_token]
            if reply.finish_reason:
                self.finish_reason = FINISH_REASONS.get(reply.finish_reason, "stop")
                return
            if self.req.sampling.max_tokens <= 1:
                self.finish_reason = "length"
                return
            decode = decision.decode
        assert decode is not None
        async with contextlib.aclosing(self._decode(decode, first_token)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _raise_if_final(self, exc: grpc.aio.AioRpcError) -> None:
        """Raise the client's error unless the request may go to another worker (see failures.py)."""
        code = exc.code()
        if is_request_error(exc):
            raise bad_request(exc.details() or "invalid request") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise timed_out(self.req.timeout_s) from None
        if not self._may_retry(exc):
            if classify(exc) is Failure.SUSPECT:
                raise worker_failed(
                    f"workers failed {self.suspects} times while running this request; not trying "
                    f"another ({code.name}: {exc.details()})"
                ) from None
            if self.attempts > MAX_ATTEMPTS:
                raise worker_failed(f"{MAX_ATTEMPTS} tries failed; last error {code.name}: {exc.details()}")
            raise worker_failed(f"worker error {code.name}: {exc.details()}") from None

    def _may_retry(self, exc: grpc.aio.AioRpcError) -> bool:
        kind = classify(exc)
        if kind is Failure.FINAL:
            return False
        if kind is Failure.SUSPECT:
            self.suspects += 1
            if self.suspects > MAX_SUSPECT:
                return False
        return self.attempts <= MAX_ATTEMPTS

    async def _prefill(self, client: WorkerClient, state: WorkerState) -> pb.PrefillResponse:
        req = self.req
        message = pb.PrefillRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_ids,
            sampling=req.sampling,
            deadline_unix_s=time.time() + self._remaining(),
        )
        started = time.perf_counter()
        state.inflight += 1
        call = client.stub.Prefill(message, timeout=self._remaining())
        self._active = (client, call)
        try:
            reply = await call
        finally:
            state.inflight -= 1
            self._cancel_active()
        self.prefill_s = time.perf_counter() - started
        return reply

    async def _decode(self, state: WorkerState, first_token: int | None) -> AsyncIterator[list[int]]:
        """Generate on ``state``'s worker. Before its first message, failures move to another
        worker; after it, greedy requests migrate (see ``_migration``), others end in an error."""
        req = self.req
        prompt = req.prompt_ids
        sampling = req.sampling
        migrated = False
        while True:
            client = self.runtime.client(state.address)
            message = pb.GenerateRequest(
                request_id=req.request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                deadline_unix_s=time.time() + self._remaining(),
            )
            if first_token is not None:
                message.first_token = first_token
            started = time.perf_counter()
            running = state
            running.inflight += 1
            call = client.stub.Generate(message, timeout=self._remaining())
            self._active = (client, call)
            received = False
            emitted: list[int] = []
            try:
                async for reply in call:
                    if self.finish_reason is not None:
                        continue  # the answer is complete: anything after its finish is dropped
                    if not received:
                        received = True
                        if self._ticket is not None:
                            self._ticket.first_token()  # no-op after a remote prefill
                            self._ticket.decode_started()
                        if first_token is None and not migrated:
                            self.cached_tokens = reply.cached_tokens
                            # the worker's compute time when it reports one (queueing excluded)
                            self.prefill_s = reply.prefill_s or time.perf_counter() - started
                        elif reply.handoff_s > 0:
                            self.handoff_s = reply.handoff_s
                    if reply.token_ids:
                        if self.ttft_s is None:
                            self.ttft_s = time.perf_counter() - self._started
                        self.completion_tokens += len(reply.token_ids)
                        if reply.logprobs:
                            self.logprobs += zip(reply.token_ids, reply.logprobs, strict=False)
                        emitted += reply.token_ids
                        yield list(reply.token_ids)
                    if reply.finish_reason:
                        self.finish_reason = FINISH_REASONS.get(reply.finish_reason, "stop")
                if self.finish_reason is None:
                    self.finish_reason = "stop"
                self.decode_s = time.perf_counter() - started
                return
            except grpc.aio.AioRpcError as exc:
                if self.finish_reason is not None:  # failed after finishing: nothing to continue
                    self.decode_s = time.perf_counter() - started
                    return
                self.attempts += 1
                if received:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise timed_out(self.req.timeout_s) from None
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        client.mark_failed(exc.details() or "unavailable")
                    migration = self._migration(exc, prompt, sampling, first_token, emitted)
                    if migration is None:
                        raise worker_failed(
                            f"the worker failed mid-stream ({exc.code().name}: {exc.details()})"
                        ) from None
                    prompt, sampling = migration
                    first_token, migrated = None, True
                    if sampling.max_tokens <= 0:
                        self.finish_reason = "length"
                        return
                else:
                    self._raise_if_final(exc)
                self._fail(client, exc)
                state = self._pick_decode()
                if self.decision is not None:
                    self.decision.decode = state
            finally:
                running.inflight -= 1
                self._cancel_active()

    def _migration(
        self,
        exc: grpc.aio.AioRpcError,
        prompt: list[int],
        sampling: pb.SamplingParams,
        first_token: int | None,
        emitted: list[int],
    ) -> tuple[list[int], pb.SamplingParams] | None:
        """How to continue a greedy request on another worker after its worker died mid-stream:
        the prompt grows by every token already sent, the budget shrinks by as many. Greedy
        decoding of that longer prompt yields exactly the tokens the dead worker would have sent
        next, so the client sees one uninterrupted answer. Sampled requests cannot be continued
        faithfully (their random stream is keyed by position), so they end in an error event."""
        if sampling.temperature != 0 or not self._may_retry(exc):
            return None
        if sampling.presence_penalty or sampling.frequency_penalty:
            return None  # they count output tokens, which would become prompt tokens
        done = ([first_token] if first_token is not None else []) + emitted
        rest = pb.SamplingParams()
        rest.CopyFrom(sampling)
        rest.max_tokens = sampling.max_tokens - len(done)
        rest.min_tokens = max(0, sampling.min_tokens - len(done))
        log.warning(
            "worker failed mid-stream; continuing the greedy request elsewhere",
            extra={"request_id": self.req.request_id, "tokens_done": len(done)},
        )
        return list(prompt) + done, rest

    # -- cleanup and feedback --------------------------------------------------------------------

    def _cancel_active(self) -> None:
        """The client went away or a stop string hit: stop the worker's work, not just our read."""
        if self._active is None:
            return
        client, call = self._active
        self._active = None
        # A call our task abandoned may already read as done (cancelled); the worker still needs
        # the Cancel RPC, since a stream reset alone may leave its sequence queued.
        if not call.done() or call.cancelled():
            call.cancel()
            client.cancel_soon(self.req.request_id)

    def _observe(self) -> None:
        if self.decision is None:
            return
        outcome = RequestOutcome(
            decision=self.decision,
            prompt_tokens=len(self.req.prompt_ids),
            cached_tokens=self.cached_tokens,
            prefill_s=self.prefill_s,
            ttft_s=self.ttft_s,
            decode_tokens=self.completion_tokens,
            decode_s=self.decode_s,
            ok=self._ok,
            handoff_s=self.handoff_s,
        )
        try:
            self.req.policy.observe(outcome)
        except Exception:  # feedback must never fail a request that already finished
            log.exception("policy.observe failed", extra={"request_id": self.req.request_id})

"""The routing contract shared by the live router and the simulator.

A policy sees a request (its block hashes and size), the current view of every worker and the
prefix index, and returns a decision. The live router (``tusk.router``) and the simulator
(``tusk.router.sim``) call the very same policy objects through this interface, which is what
lets simulated results speak for the real router.

Pipeline (as in llm-d's scheduler): filter -> score -> pick. Policies are free to implement
``route`` however they like, but the built-in ones compose those three steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tusk.config import Role

# Priors every policy and the router's admission queue share (one definition each):
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0  # a worker's prefill rate until it reports its own
DEFAULT_CLAIM_TTL_S = 2.0  # how long a routing claim counts unconfirmed (llm-d pre-inserts ~2 s)


@dataclass
class WorkerState:
    """The router's live view of one worker. Load fields come from the worker's LoadReport;
    ``inflight`` is counted by the router itself, so it is exact even between load polls."""

    worker_id: str
    address: str
    role: Role = Role.BOTH
    healthy: bool = True
    inflight: int = 0
    running_requests: int = 0
    queued_requests: int = 0
    queued_prefill_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    # KV blocks of requests sent there beyond what its cache can hold now: they wait for running
    # requests to finish before they can start (from the router's load account; 0 when unknown)
    kv_overcommit_blocks: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0

    @property
    def can_prefill(self) -> bool:
        return self.role in (Role.PREFILL, Role.BOTH)

    @property
    def can_decode(self) -> bool:
        return self.role in (Role.DECODE, Role.BOTH)


@dataclass
class RoutingRequest:
    request_id: str
    block_hashes: list[int]
    prompt_tokens: int
    block_size: int
    session_key: str | None = None  # sticky key: a session header or the OpenAI `user` field
    max_tokens: int = 0


@dataclass
class RoutingDecision:
    """``prefill`` is None when the decode worker prefills by itself (aggregated)."""

    decode: WorkerState
    prefill: WorkerState | None = None
    reason: str = ""
    expected_cached_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class RequestOutcome:
    """One finished request: feedback for policies that learn (the ``cost`` policy) and the
    record every replay summarizes (``tusk.router.sim.metrics.summarize_outcomes``): the
    simulator, the live router and the load generator all produce it. ``decision`` is None
    where the producer did not route (a client-side replay)."""

    decision: RoutingDecision | None
    prompt_tokens: int
    cached_tokens: int
    prefill_s: float | None  # time spent prefilling, wherever that ran
    ttft_s: float | None
    decode_tokens: int = 0
    decode_s: float | None = None
    ok: bool = True
    # disaggregated only: first token (end of remote prefill) -> decode running on the decode
    # worker, i.e. the KV handoff the request paid for being split. None when aggregated.
    handoff_s: float | None = None
    error: str | None = None  # why ok is False, e.g. "HTTP 503"


class NoWorkerAvailable(RuntimeError):
    """No healthy worker can serve the request; the router answers 503."""


@runtime_checkable
class Policy(Protocol):
    name: str

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision: ...

    def observe(self, outcome: RequestOutcome) -> None: ...

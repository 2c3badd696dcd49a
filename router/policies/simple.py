"""Cache-blind and hash-based policies: the baselines every peer ships.

Each one picks independently in each pool: in a disaggregated cluster it always sends the
prefill to a prefill worker and the decode to a decode worker; otherwise it picks one worker
that does both. None of them looks at the prefix index except through hashing.
"""

from __future__ import annotations

import random as _random

from tusk.router.policies.base import RequestOutcome, RoutingDecision, RoutingRequest, WorkerState
from tusk.router.policies.pools import (
    digest64,
    least_loaded,
    prefix_key,
    rendezvous,
    rendezvous_weight,
    split_pools,
)


class PoolPolicy:
    """filter (healthy pools) -> pick per pool. Subclasses implement ``pick``."""

    name = "pool"

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision:
        pools = split_pools(workers)
        decode = self.pick(request, pools.decode, "decode")
        prefill = self.pick(request, pools.prefill, "prefill") if pools.disaggregated else None
        return RoutingDecision(decode=decode, prefill=prefill, reason=self.name)

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        raise NotImplementedError

    def observe(self, outcome: RequestOutcome) -> None:
        return None


class RoundRobin(PoolPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        i = self._next.get(phase, 0)
        self._next[phase] = i + 1
        return candidates[i % len(candidates)]


class RandomPolicy(PoolPolicy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = _random.Random(seed)

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        return candidates[self._rng.randrange(len(candidates))]


class LeastRequest(PoolPolicy):
    name = "least_request"

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        return least_loaded(candidates)


class Session(PoolPolicy):
    """Sticky by ``session_key`` via rendezvous hashing (stateless, survives router restarts
    and replicas agree); requests without a key go to the least-loaded worker."""

    name = "session"

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        if not request.session_key:
            return least_loaded(candidates)
        return rendezvous(request.session_key.encode(), candidates)


class PrefixHash(PoolPolicy):
    """Consistent hashing on the prompt prefix: the hash of block ``prefix_blocks`` (chained, so
    it names the whole prefix up to there), with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
    "Consistent Hashing with Bounded Loads", 2018): a worker already holding more than
    ``load_factor`` x the mean in-flight count (rounded up) is skipped for the next one in the
    key's rendezvous order. Prompts shorter than one block go least-loaded."""

    name = "prefix_hash"

    def __init__(self, prefix_blocks: int = 1, load_factor: float = 1.25) -> None:
        if prefix_blocks < 1:
            raise ValueError("prefix_blocks must be >= 1")
        if not load_factor >= 1:
            raise ValueError("load_factor must be >= 1")
        self.prefix_blocks = prefix_blocks
        self.load_factor = load_factor

    def pick(self, request: RoutingRequest, candidates: list[WorkerState], phase: str) -> WorkerState:
        key = prefix_key(request, self.prefix_blocks)
        if key is None:
            return least_loaded(candidates)
        home = rendezvous(key, candidates)
        cap = -(-self.load_factor * (sum(w.inflight for w in candidates) + 1) // len(candidates))
        if home.inflight + 1 <= cap:
            return home
        k = digest64(key)
        ordered = sorted(candidates, key=lambda w: -rendezvous_weight(k, w.worker_id))
        return next((w for w in ordered if w.inflight + 1 <= cap), home)

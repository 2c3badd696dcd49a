"""filter -> score -> pick, for real: small named scorers, weighted per profile.

A scorer maps every candidate to a number in [0, 1] (higher is better); a ``WeightedPolicy``
sums ``weight x score`` per candidate and picks the maximum (llm-d's max-score-picker); ties go
to the prompt's rendezvous-hash home so equal workers still spread prefixes evenly. Filtering
is the pool split shared by every policy (healthy workers, prefill vs decode-capable).

Scorers (``SCORERS``):

* ``prefix``: matched leading blocks / request blocks (llm-d precise-prefix-cache-scorer).
* ``queue``: min-max over the waiting queue (llm-d queue-scorer: (max - q) / (max - min), 1 when
  all equal).
* ``inflight_tokens``: min-max over prompt tokens not yet prefilled (the router's load account).
* ``kv_usage``: free KV fraction (llm-d kv-cache-utilization-scorer: 1 - usage).
* ``session``: 1 for the session key's rendezvous home, else 0 (session affinity).
* ``load``: min-max over router-counted in-flight requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tusk.router.policies.base import RequestOutcome, RoutingDecision, RoutingRequest, WorkerState
from tusk.router.policies.pools import digest64, rendezvous, rendezvous_weight, split_pools
from tusk.router.prefix_index import PrefixIndex


@dataclass
class ScoreContext:
    request: RoutingRequest
    matches: dict[str, int]


Scorer = Callable[[ScoreContext, Sequence[WorkerState]], list[float]]


def _min_max(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    return [(hi - v) / (hi - lo) for v in values]


def score_prefix(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    n = len(ctx.request.block_hashes)
    if not n:
        return [0.0] * len(ws)
    return [ctx.matches.get(w.worker_id, 0) / n for w in ws]


def score_queue(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    return _min_max([float(w.queued_requests) for w in ws])


def score_inflight_tokens(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    return _min_max([float(w.queued_prefill_tokens) for w in ws])


def score_kv_usage(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    return [w.free_blocks / w.total_blocks if w.total_blocks else 1.0 for w in ws]


def score_session(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    key = ctx.request.session_key
    if not key:
        return [0.0] * len(ws)
    home = rendezvous(key.encode(), ws).worker_id
    return [1.0 if w.worker_id == home else 0.0 for w in ws]


def score_load(ctx: ScoreContext, ws: Sequence[WorkerState]) -> list[float]:
    return _min_max([float(w.inflight) for w in ws])


SCORERS: dict[str, Scorer] = {
    "prefix": score_prefix,
    "queue": score_queue,
    "inflight_tokens": score_inflight_tokens,
    "kv_usage": score_kv_usage,
    "session": score_session,
    "load": score_load,
}
SCORER_NAMES: tuple[str, ...] = tuple(SCORERS)


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Validate a profile's weights: known scorer names, finite non-negative numbers."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(
            f"weights must be a non-empty mapping of scorer name to weight; scorers: {', '.join(SCORER_NAMES)}"
        )
    unknown = sorted(set(weights) - set(SCORERS))
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(unknown)}; valid scorers: {', '.join(SCORER_NAMES)}")
    out = {}
    for name, weight in weights.items():
        w = float(weight)
        if not w >= 0 or w == float("inf"):
            raise ValueError(f"scorer {name!r}: weight must be a finite number >= 0, got {weight!r}")
        out[name] = w
    return out


def _home_key(request: RoutingRequest) -> int:
    return request.block_hashes[0] if request.block_hashes else digest64(request.request_id.encode())


class WeightedPolicy:
    """Sum of weighted scorers, max-score pick, in each pool (a disaggregated cluster picks a
    prefill worker and a decode worker independently, as llm-d's P/D profiles do)."""

    name = "weighted"

    def __init__(self, index: PrefixIndex, weights: dict[str, float] | None = None) -> None:
        self.index = index
        self.weights = check_weights(weights or {"prefix": 3.0, "kv_usage": 2.0, "queue": 2.0})

    def pick(self, ctx: ScoreContext, candidates: list[WorkerState]) -> WorkerState:
        totals = [0.0] * len(candidates)
        for name, weight in self.weights.items():
            if weight:
                for i, s in enumerate(SCORERS[name](ctx, candidates)):
                    totals[i] += weight * s
        key = _home_key(ctx.request)
        best = max(
            range(len(candidates)), key=lambda i: (totals[i], rendezvous_weight(key, candidates[i].worker_id))
        )
        return candidates[best]

    def _context(self, request: RoutingRequest) -> ScoreContext:
        hashes = request.block_hashes
        return ScoreContext(request, self.index.match(hashes) if hashes else {})

    def _cached(self, ctx: ScoreContext, w: WorkerState) -> int:
        return min(ctx.request.prompt_tokens, ctx.matches.get(w.worker_id, 0) * ctx.request.block_size)

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision:
        pools = split_pools(workers)
        ctx = self._context(request)
        decode = self.pick(ctx, pools.decode)
        if pools.disaggregated:
            prefill = self.pick(ctx, pools.prefill)
            return RoutingDecision(decode, prefill, self.name, self._cached(ctx, prefill))
        return RoutingDecision(decode, None, self.name, self._cached(ctx, decode))

    def observe(self, outcome: RequestOutcome) -> None:
        return None

"""tusk's ``cost`` policy: route by estimated time to first token, and split prefill from
decode only when it pays.

Per candidate worker ``w`` that could prefill the request::

    cached_w  = max(local prefix match on w, prefix in the shared tier)      (blocks)
    uncached  = prompt_tokens - cached_w * block_size
    queue_s   = w.queued_prefill_tokens / rate_w
    kv_wait_s = 0, or when w lacks free KV blocks for prompt + max_tokens: the blocks that
                must be released first -- this request's shortfall plus what requests routed
                there earlier already wait for (``w.kv_overcommit_blocks``) -- as a share of
                the request's own, x w.decode_step_s x max_tokens (the time decodes like this
                request take to release that much)
    compute_s = uncached / rate_w + ceil((queued + uncached) / chunk_tokens) * w.decode_step_s
    fetch_s   = (tier blocks beyond the local match) * tier_fetch_s_per_block
    ttft_w    = max(queue_s, fetch_s) + kv_wait_s + compute_s   (the fetch overlaps the queue)

``compute_s`` charges one decode step per prefill chunk because chunked prefill shares every
engine step with the running decode batch.

Decode worker (disaggregated clusters): the most free KV blocks (fraction) minus running load.

Conditional disaggregation, per request (clusters with prefill workers): with ``local`` the best
decode-capable worker and ``remote`` the best prefill worker by the estimate above, split when::

    ttft_remote < ttft_local + (saturation_ratio - 1) * compute_local

i.e. a second of prefill compute on a decode worker is charged ``saturation_ratio`` (1.75)
seconds: it stalls that worker's running decodes and pins its KV while it runs, and it leaves
the prompt's KV cached on that decode worker only, where a split leaves it on the prefill worker
and (after the handoff) on the decode worker too. Queue waits count one for one, so when the
prefill pool backs up the rule turns into join-the-shortest-wait and sheds work to the decode
workers. The KV handoff is not charged: it delays the second token, not the first. The ratio was
chosen in the simulator over three P/D layouts, two traces and two loads (docs/routing.md).

A fixed ``disaggregation_threshold_tokens`` replaces the rule: below it stay local, above it
split unless the prefill pool is saturated (its TTFT estimate above ``saturation_ratio`` times
the local one).

Reported, no longer deciding: ``threshold_tokens`` is still learnt online from ``observe``::

    T = r_local * (o + m * s_decode)

* ``r_local``: EWMA of observed prefill throughput of aggregated prefills (uncached tokens /
  prefill seconds, the worker's own compute time).
* ``o``: EWMA of the measured KV handoff (``handoff_s``) plus how much longer disaggregated
  requests waited before prefill than aggregated ones (floored at 0).
* ``s_decode``: EWMA of observed inter-token time; ``m`` = ``stall_budget_steps``.

It was the split rule until it proved to split too little: prompts below ``T`` stayed local
whatever the queues (live, 2 prefill + 6 decode workers: p90 TTFT 3.07 s against 2.43 s for
always splitting; simulated on the agentic trace, up to 20x worse than always splitting).
"""

from __future__ import annotations

import math

from tusk.router.policies.base import (
    DEFAULT_CLAIM_TTL_S,
    DEFAULT_PREFILL_TOKENS_PER_S,
    RequestOutcome,
    RoutingDecision,
    RoutingRequest,
    WorkerState,
)
from tusk.router.policies.pools import digest64, rendezvous_weight, split_pools
from tusk.router.prefix_index import PrefixIndex


class _Ewma:
    __slots__ = ("alpha", "value", "samples")

    def __init__(self, alpha: float, prior: float) -> None:
        self.alpha = alpha
        self.value = prior
        self.samples = 0

    def add(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)
        self.samples += 1


def _tie(w: WorkerState, request: RoutingRequest) -> tuple[float, int, int]:
    """Order among equal scores (typically idle workers and a prompt nobody has cached): more
    free KV, fewer in-flight, then the prompt's rendezvous-hash home. The last key spreads new
    prefixes evenly over the cluster, so its total KV capacity acts as one cache, and sends a
    prefix back to the same worker even after the index lost track of it."""
    free = w.free_blocks / w.total_blocks if w.total_blocks else 1.0
    key = request.block_hashes[0] if request.block_hashes else digest64(request.request_id.encode())
    return (-free, w.inflight, -rendezvous_weight(key, w.worker_id))


class CostPolicy:
    name = "cost"

    def __init__(
        self,
        index: PrefixIndex,
        disaggregation_threshold_tokens: int | None = None,
        default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
        chunk_tokens: int = 8192,
        tier_fetch_s_per_block: float = 0.001,
        stall_budget_steps: float = 4.0,
        saturation_ratio: float = 1.75,
        ewma_alpha: float = 0.05,
        prior_overhead_s: float = 0.05,
        prior_decode_step_s: float = 0.02,
        min_threshold_tokens: int = 0,
        max_threshold_tokens: int = 1 << 17,
        threshold_tokens: int | None = None,
        recompute_weight: float = 4.0,
        claim_routes: bool = True,
        claim_ttl_s: float = DEFAULT_CLAIM_TTL_S,
    ) -> None:
        # ``threshold_tokens`` is an alias of ``disaggregation_threshold_tokens`` (the router's name).
        if disaggregation_threshold_tokens is None:
            disaggregation_threshold_tokens = threshold_tokens
        if disaggregation_threshold_tokens is not None and disaggregation_threshold_tokens < 0:
            raise ValueError("disaggregation_threshold_tokens must be >= 0")
        if default_prefill_tokens_per_s <= 0 or chunk_tokens <= 0:
            raise ValueError("default_prefill_tokens_per_s and chunk_tokens must be > 0")
        if not 0 < ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")
        self.index = index
        self.recompute_weight = recompute_weight
        self.claim_routes = claim_routes
        if claim_ttl_s <= 0:
            raise ValueError("claim_ttl_s must be > 0")
        self.claim_ttl_s = claim_ttl_s
        self.override = disaggregation_threshold_tokens
        self.default_rate = default_prefill_tokens_per_s
        self.chunk_tokens = chunk_tokens
        self.tier_fetch_s_per_block = tier_fetch_s_per_block
        self.stall_budget_steps = stall_budget_steps
        self.saturation_ratio = saturation_ratio
        self.min_threshold = min_threshold_tokens
        self.max_threshold = max_threshold_tokens
        self.local_rate = _Ewma(ewma_alpha, default_prefill_tokens_per_s)
        self.handoff_s = _Ewma(ewma_alpha, prior_overhead_s)
        self.wait_disagg_s = _Ewma(ewma_alpha, 0.0)
        self.wait_agg_s = _Ewma(ewma_alpha, 0.0)
        self.decode_step_s = _Ewma(ewma_alpha, prior_decode_step_s)

    # ----------------------------------------------------------------- threshold
    @property
    def overhead_s(self) -> float:
        return self.handoff_s.value + max(0.0, self.wait_disagg_s.value - self.wait_agg_s.value)

    @property
    def threshold_tokens(self) -> int:
        if self.override is not None:
            return self.override
        t = self.local_rate.value * (self.overhead_s + self.stall_budget_steps * self.decode_step_s.value)
        return int(min(self.max_threshold, max(self.min_threshold, t)))

    def observe(self, outcome: RequestOutcome) -> None:
        if not outcome.ok:
            return
        aggregated = outcome.decision.prefill is None
        if outcome.prefill_s is not None and outcome.prefill_s > 0:
            uncached = outcome.prompt_tokens - outcome.cached_tokens
            if aggregated and uncached > 0:
                self.local_rate.add(uncached / outcome.prefill_s)
            if outcome.ttft_s is not None:
                wait = max(0.0, outcome.ttft_s - outcome.prefill_s)
                (self.wait_agg_s if aggregated else self.wait_disagg_s).add(wait)
        if not aggregated and outcome.handoff_s is not None:
            self.handoff_s.add(max(0.0, outcome.handoff_s))
        if outcome.decode_s is not None and outcome.decode_tokens > 0:
            self.decode_step_s.add(outcome.decode_s / outcome.decode_tokens)

    # ----------------------------------------------------------------- routing
    def _best(
        self,
        candidates: list[WorkerState],
        request: RoutingRequest,
        matches: dict[str, int],
        tier: int,
        scores: dict[str, float],
    ) -> WorkerState:
        """The worker with the lowest routing score
        ``ttft + recompute_weight * uncached / rate``; ties go to more free KV, then fewer
        in-flight requests. This loop is the hot path (one pass over the candidates, inlined
        arithmetic): keep it free of calls."""
        prompt = request.prompt_tokens
        bs = request.block_size
        default_rate = self.default_rate
        chunk = self.chunk_tokens
        fetch_per_block = self.tier_fetch_s_per_block
        weight = self.recompute_weight
        best = candidates[0]
        best_score = math.inf
        get_match = matches.get
        # without a local match every candidate has the same uncached count and tier fetch
        cold_cached = tier * bs
        cold_uncached = prompt - cold_cached if cold_cached < prompt else 0
        cold_fetch = tier * fetch_per_block
        # KV blocks the request pins (prompt + output): a worker without that much room cannot
        # start the prefill until running decodes release it
        need = -(-(prompt + request.max_tokens) // bs) if bs else 0
        out_steps = request.max_tokens if request.max_tokens > 1 else 1
        for w in candidates:
            wid = w.worker_id
            local = get_match(wid, 0)
            rate = w.prefill_tokens_per_s or default_rate
            queued = w.queued_prefill_tokens
            wait = queued / rate
            if local:
                cached = (local if local > tier else tier) * bs
                uncached = prompt - cached if cached < prompt else 0
                fetch = (tier - local) * fetch_per_block if tier > local else 0.0
            else:
                uncached = cold_uncached
                fetch = cold_fetch
            if fetch > wait:
                wait = fetch
            # a worker admits in order: requests already waiting there for KV go first
            short = need - w.free_blocks + w.kv_overcommit_blocks
            if short > 0 and w.total_blocks:
                wait += short / need * w.decode_step_s * out_steps
            ttft = wait + uncached / rate + -(-(queued + uncached) // chunk) * w.decode_step_s
            scores[wid] = ttft
            score = ttft + weight * uncached / rate
            if score < best_score or (score == best_score and _tie(w, request) < _tie(best, request)):
                best, best_score = w, score
        return best  # a bare worker, not a tuple: one GC-tracked allocation fewer per decision

    def _compute_s(self, w: WorkerState, uncached: int) -> float:
        """The compute share of ``w``'s TTFT estimate (``_best`` inlines the same terms): the
        prompt at the reported rate plus one decode step per chunk it shares with decodes."""
        rate = w.prefill_tokens_per_s or self.default_rate
        chunks = -(-(w.queued_prefill_tokens + uncached) // self.chunk_tokens)
        return uncached / rate + chunks * w.decode_step_s

    @staticmethod
    def _uncached(request: RoutingRequest, matches: dict[str, int], tier: int, w: WorkerState) -> int:
        local = matches.get(w.worker_id, 0)
        return max(0, request.prompt_tokens - max(local, tier) * request.block_size)

    def _claim(self, w: WorkerState, hashes: list[int], matches: dict[str, int]) -> None:
        """Tell the index ``w`` is about to hold these blocks, before its KV events say so.

        Without it, the next turn of a conversation that arrives while this prefill runs
        sees no match and lands elsewhere, duplicating the prefix. The worker stores every
        prompt block once the prefill is done and reports evictions as usual, so the claim
        only runs ahead of the events, it does not contradict them; an unconfirmed claim
        expires after ``claim_ttl_s`` (llm-d pre-inserts for about 2 s)."""
        # a claim is one record of the whole chain; none is needed when w covers it already
        if self.claim_routes and hashes and matches.get(w.worker_id, 0) < len(hashes):
            self.index.claim(w.worker_id, hashes, self.claim_ttl_s)

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision:
        """``decision.reason`` is one of a fixed set (it is a metrics label):
        ``aggregated-cluster``, ``local-faster``, ``disaggregated``, and with a fixed threshold
        ``below-threshold``, ``prefill-saturated``.
        ``decision.scores`` holds each candidate's estimated TTFT in seconds."""
        prefill_pool, decode_pool = split_pools(workers)
        hashes = request.block_hashes
        matches = self.index.match(hashes) if hashes else {}
        tier = self.index.tier_match(hashes) if hashes else 0
        scores: dict[str, float] = {}

        local_w = self._best(decode_pool, request, matches, tier, scores)
        local_uncached = self._uncached(request, matches, tier, local_w)
        reason = None
        if not prefill_pool:
            reason = "aggregated-cluster"
        elif self.override is not None and local_uncached < self.override:
            reason = "below-threshold"
        else:
            remote_w = self._best(prefill_pool, request, matches, tier, scores)
            remote_uncached = self._uncached(request, matches, tier, remote_w)
            remote_ttft, local_ttft = scores[remote_w.worker_id], scores[local_w.worker_id]
            if self.override is not None:
                # a fixed threshold: split above it unless the prefill pool is saturated
                if remote_ttft > self.saturation_ratio * max(local_ttft, 1e-3):
                    reason = "prefill-saturated"
            else:
                # per request: the prefill worker's TTFT against the decode worker's, whose
                # prefill compute counts saturation_ratio times (see the module docstring)
                local_compute = self._compute_s(local_w, local_uncached)
                if remote_ttft >= local_ttft + (self.saturation_ratio - 1.0) * local_compute:
                    reason = "local-faster"
        if reason is not None:
            self._claim(local_w, hashes, matches)
            return RoutingDecision(
                decode=local_w,
                reason=reason,
                expected_cached_tokens=request.prompt_tokens - local_uncached,
                scores=scores,
            )

        max_running = max(w.running_requests for w in decode_pool)

        def decode_score(w: WorkerState) -> tuple[float, int]:
            free = w.free_blocks / w.total_blocks if w.total_blocks else 1.0
            return (free - w.running_requests / (max_running + 1), -w.inflight)

        decode = max(decode_pool, key=decode_score)
        self._claim(remote_w, hashes, matches)
        self._claim(decode, hashes, matches)
        return RoutingDecision(
            decode=decode,
            prefill=remote_w,
            reason="disaggregated",
            expected_cached_tokens=request.prompt_tokens - remote_uncached,
            scores=scores,
        )

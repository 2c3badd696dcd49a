"""SGLang-style cache-aware routing: follow the longest prefix match unless load is out of
balance, then fall back to the least-loaded worker. The chosen worker's prefix is inserted on
every route, as SGLang/SMG insert the request into the chosen worker's tree (here a claim that
KV events confirm or that expires after ``claim_ttl_s``; ``claim_ttl_s=None`` keeps it until
the index's LRU bound pushes it out, which is SGLang's tree without events).

Defaults are current smg's (``smg launch --help``, smg 1.13.0): cache threshold 0.3, balance
abs 64, rel 1.5.

The balance test is SGLang's: the cluster is imbalanced when ``max_load - min_load`` exceeds
``balance_abs_threshold`` *and* ``max_load > balance_rel_threshold * min_load`` (load = router
in-flight count). Below ``cache_threshold`` match ratio the request goes to the worker with the
fewest indexed blocks (the most room to cache something new), as SGLang does with its trees.
"""

from __future__ import annotations

from tusk.router.policies.base import (
    DEFAULT_CLAIM_TTL_S,
    RequestOutcome,
    RoutingDecision,
    RoutingRequest,
    WorkerState,
)
from tusk.router.policies.pools import least_loaded, split_pools
from tusk.router.prefix_index import PrefixIndex


class CacheAware:
    name = "cache_aware"

    def __init__(
        self,
        index: PrefixIndex,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        insert_on_route: bool = True,
        claim_ttl_s: float | None = DEFAULT_CLAIM_TTL_S,
    ) -> None:
        if not 0 <= cache_threshold <= 1 or balance_abs_threshold < 0 or balance_rel_threshold < 1:
            raise ValueError(
                "cache_threshold must be in [0, 1], balance_abs_threshold >= 0, balance_rel_threshold >= 1"
            )
        self.index = index
        self.insert_on_route = insert_on_route
        self.claim_ttl_s = claim_ttl_s
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision:
        pools = split_pools(workers)
        if pools.disaggregated:
            prefill, cached = self._pick(request, pools.prefill)
            return RoutingDecision(
                decode=least_loaded(pools.decode),
                prefill=prefill,
                reason=self.name,
                expected_cached_tokens=cached,
            )
        decode, cached = self._pick(request, pools.decode)
        return RoutingDecision(decode=decode, reason=self.name, expected_cached_tokens=cached)

    def _insert(self, w: WorkerState, hashes: list[int]) -> None:
        if not self.insert_on_route or not hashes:
            return
        if self.claim_ttl_s is None:
            self.index.record_route(w.worker_id, hashes)
        else:
            self.index.claim(w.worker_id, hashes, self.claim_ttl_s)

    def _pick(self, request: RoutingRequest, candidates: list[WorkerState]) -> tuple[WorkerState, int]:
        loads = [w.inflight for w in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            w = least_loaded(candidates)
            cached = self._cached_tokens(request, w)
            self._insert(w, request.block_hashes)
            return w, cached
        matches = self.index.match(request.block_hashes) if request.block_hashes else {}
        best = max((matches.get(w.worker_id, 0) for w in candidates), default=0)
        n = len(request.block_hashes)
        if n and best / n > self.cache_threshold:
            top = [w for w in candidates if matches.get(w.worker_id, 0) == best]
            w = least_loaded(top)
        else:
            w = min(candidates, key=lambda c: (self.index.worker_blocks(c.worker_id), c.inflight))
        self._insert(w, request.block_hashes)
        return w, min(request.prompt_tokens, matches.get(w.worker_id, 0) * request.block_size)

    def _cached_tokens(self, request: RoutingRequest, w: WorkerState) -> int:
        blocks = self.index.match(request.block_hashes).get(w.worker_id, 0) if request.block_hashes else 0
        return min(request.prompt_tokens, blocks * request.block_size)

    def observe(self, outcome: RequestOutcome) -> None:
        return None

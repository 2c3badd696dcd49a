"""SGLang-style cache-aware routing: follow the longest prefix match unless load is out of
balance, then fall back to the least-loaded worker.

The balance test is SGLang's: the cluster is imbalanced when ``max_load - min_load`` exceeds
``balance_abs_threshold`` *and* ``max_load > balance_rel_threshold * min_load`` (load = router
in-flight count). Below ``cache_threshold`` match ratio the request goes to the worker with the
fewest indexed blocks (the most room to cache something new), as SGLang does with its trees.
"""

from __future__ import annotations

from tusk.router.policies.base import RequestOutcome, RoutingDecision, RoutingRequest, WorkerState
from tusk.router.policies.pools import least_loaded, split_pools
from tusk.router.prefix_index import PrefixIndex


class CacheAware:
    name = "cache_aware"

    def __init__(
        self,
        index: PrefixIndex,
        cache_threshold: float = 0.5,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.0001,
    ) -> None:
        self.index = index
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

    def _pick(self, request: RoutingRequest, candidates: list[WorkerState]) -> tuple[WorkerState, int]:
        loads = [w.inflight for w in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            w = least_loaded(candidates)
            return w, self._cached_tokens(request, w)
        matches = self.index.match(request.block_hashes) if request.block_hashes else {}
        best = max((matches.get(w.worker_id, 0) for w in candidates), default=0)
        n = len(request.block_hashes)
        if n and best / n > self.cache_threshold:
            top = [w for w in candidates if matches.get(w.worker_id, 0) == best]
            w = least_loaded(top)
        else:
            w = min(candidates, key=lambda c: (self.index.worker_blocks(c.worker_id), c.inflight))
        return w, min(request.prompt_tokens, matches.get(w.worker_id, 0) * request.block_size)

    def _cached_tokens(self, request: RoutingRequest, w: WorkerState) -> int:
        blocks = self.index.match(request.block_hashes).get(w.worker_id, 0) if request.block_hashes else 0
        return min(request.prompt_tokens, blocks * request.block_size)

    def observe(self, outcome: RequestOutcome) -> None:
        return None

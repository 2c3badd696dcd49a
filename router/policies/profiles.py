"""Peer routers' policies, expressed faithfully on tusk's pipeline so they run on the same index,
the same load account and the same simulator as tusk's own ``cost`` policy.

Each class cites where its rule and defaults come from. Where a peer's rule needs information
tusk's router has in a different form, the docstring says how it is mapped.
"""

from __future__ import annotations

from tusk.router.policies.base import RoutingDecision, RoutingRequest, WorkerState
from tusk.router.policies.cache_aware import CacheAware
from tusk.router.policies.pools import rendezvous_weight, split_pools
from tusk.router.policies.scorers import ScoreContext, WeightedPolicy, _home_key
from tusk.router.prefix_index import PrefixIndex


class SGLangCacheAware(CacheAware):
    """SGLang / SMG ``cache_aware`` as it runs over HTTP: an approximate prefix tree per worker
    fed only by the router's own decisions (insert on every route; no KV events), evicted by
    size (``max_tree_size``), load = the router's in-flight count, defaults from ``smg launch
    --help`` of smg 1.13.0 (the version on PyPI here): cache threshold 0.3, balance abs 64,
    rel 1.5. The tree here counts blocks, not characters; its bound is ``tree_blocks_per_worker``.
    """

    name = "sglang_cache_aware"

    def __init__(
        self,
        index: PrefixIndex,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        tree_blocks_per_worker: int = 1 << 20,
    ) -> None:
        # its own tree: SGLang's router never sees the engines' KV events over HTTP
        super().__init__(
            PrefixIndex(max_blocks_per_worker=tree_blocks_per_worker),
            cache_threshold,
            balance_abs_threshold,
            balance_rel_threshold,
            insert_on_route=True,
            claim_ttl_s=None,
        )


class LlmdWeighted(WeightedPolicy):
    """llm-d precise-prefix-cache routing: precise-prefix-cache-scorer (KV events) weight 3,
    kv-cache-utilization-scorer 2, queue-scorer 2, max-score-picker (llm-d
    ``guides/precise-prefix-cache-aware`` EndpointPickerConfig)."""

    name = "llmd_weighted"

    def __init__(self, index: PrefixIndex, weights: dict[str, float] | None = None) -> None:
        super().__init__(index, weights or {"prefix": 3.0, "kv_usage": 2.0, "queue": 2.0})


class LlmdSticky(WeightedPolicy):
    """llm-d's default "sticky until saturated": stay on the worker holding the longest prefix
    unless it is saturated, then score the unsaturated rest by queue and KV utilisation.
    Saturation is the Gateway API Inference Extension's saturation detector with its defaults:
    waiting queue >= ``queue_depth_threshold`` (5) or KV utilisation >=
    ``kv_util_threshold`` (0.8)."""

    name = "llmd_sticky"

    def __init__(
        self,
        index: PrefixIndex,
        queue_depth_threshold: int = 5,
        kv_util_threshold: float = 0.8,
        weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__(index, weights or {"queue": 1.0, "kv_usage": 1.0})
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_util_threshold = kv_util_threshold

    def _saturated(self, w: WorkerState) -> bool:
        used = 1.0 - (w.free_blocks / w.total_blocks if w.total_blocks else 1.0)
        return w.queued_requests >= self.queue_depth_threshold or used >= self.kv_util_threshold

    def pick(self, ctx: ScoreContext, candidates: list[WorkerState]) -> WorkerState:
        open_ = [w for w in candidates if not self._saturated(w)] or candidates
        best = max((ctx.matches.get(w.worker_id, 0) for w in open_), default=0)
        if best > 0:
            key = _home_key(ctx.request)
            top = [w for w in open_ if ctx.matches.get(w.worker_id, 0) == best]
            return max(top, key=lambda w: (-w.queued_requests, rendezvous_weight(key, w.worker_id)))
        return super().pick(ctx, open_)


class DynamoCost(WeightedPolicy):
    """NVIDIA Dynamo's KV router cost (docs "Router Design", v1.6.0): per worker

        cost = overlap_score_weight x potential prefill blocks + potential decode blocks

    potential prefill blocks = (uncached prompt tokens after the cache credit + prompt tokens
    still to prefill there) / block size; potential decode blocks = the worker's active blocks
    + the request's blocks. The lowest cost wins (router temperature 0: deterministic);
    ``overlap_score_weight`` defaults to 1.0. Active blocks and prefill tokens come from the
    router's own account (``tusk.router.load_account``), as Dynamo's active-sequence tracking."""

    name = "dynamo_cost"

    def __init__(self, index: PrefixIndex, overlap_score_weight: float = 1.0) -> None:
        super().__init__(index, {"prefix": 1.0})
        if overlap_score_weight < 0:
            raise ValueError("overlap_score_weight must be >= 0")
        self.overlap_score_weight = overlap_score_weight

    def pick(self, ctx: ScoreContext, candidates: list[WorkerState]) -> WorkerState:
        r = ctx.request
        bs = max(1, r.block_size)
        blocks = -(-(r.prompt_tokens + r.max_tokens) // bs)
        key = _home_key(r)

        def cost(w: WorkerState) -> tuple[float, int]:
            cached = min(r.prompt_tokens, ctx.matches.get(w.worker_id, 0) * bs)
            prefill = (r.prompt_tokens - cached + w.queued_prefill_tokens) / bs
            active = (w.total_blocks - w.free_blocks) if w.total_blocks else 0
            return (
                self.overlap_score_weight * prefill + active + blocks,
                -rendezvous_weight(key, w.worker_id),
            )

        return min(candidates, key=cost)

    def route(self, request: RoutingRequest, workers: list[WorkerState]) -> RoutingDecision:
        split_pools(workers)  # raises when nobody can decode
        return super().route(request, workers)

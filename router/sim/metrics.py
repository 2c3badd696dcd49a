"""Percentiles, the request-outcome summary and the two hit-rate upper bounds.

``percentile`` is the one percentile definition of every routing number (simulator, live
replay, load generator); ``summarize_outcomes`` is the one summary of ``RequestOutcome``s.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from tusk.router.policies.base import RequestOutcome


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_outcomes(
    outcomes: Sequence[RequestOutcome], ttft_slo_s: float = 2.0, itl_slo_s: float = 0.1
) -> dict[str, Any]:
    """TTFT percentiles, mean inter-token time per request (TPOT) percentiles, hit rate
    (cached / prompt tokens, as engines report ``cached_tokens``), SLO attainment (TTFT <=
    ``ttft_slo_s`` and TPOT <= ``itl_slo_s``, over all requests) and errors."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]

    def tpot(o: RequestOutcome) -> float:
        return o.decode_s / o.decode_tokens if o.decode_s is not None and o.decode_tokens > 0 else 0.0

    tpots = [tpot(o) for o in ok]
    prompt = sum(o.prompt_tokens for o in ok)
    slo = sum(1 for o in ok if o.ttft_s is not None and o.ttft_s <= ttft_slo_s and tpot(o) <= itl_slo_s)
    return {
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": len(outcomes) - len(ok),
        "error_kinds": dict(Counter(o.error or "error" for o in outcomes if not o.ok)),
        "hit_rate": sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p90_s": percentile(tpots, 90),
        "slo_attainment": slo / len(outcomes) if outcomes else 0.0,
    }


def weighted_percentile(samples: Sequence[tuple[float, float]], q: float) -> float:
    """Percentile of values carrying weights (ITL: step seconds x tokens produced at it)."""
    pairs = sorted((v, w) for v, w in samples if w > 0)
    total = sum(w for _, w in pairs)
    if not total:
        return 0.0
    target = total * q / 100.0
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= target:
            return v
    return pairs[-1][0]


def ideal_hit_rates(requests: Sequence[Sequence[int]], capacity_blocks: int) -> tuple[float, float]:
    """(infinite-cache, pooled-capacity-LRU) block hit rates in arrival order.

    Infinite: a request's leading run of blocks seen in any earlier request. Pooled: the same
    with one LRU cache as big as the whole cluster's KV (plus tier) -- what a perfect router
    that could use every worker's memory as one cache would reach. Both count only leading runs
    because a block is reusable only behind a fully matching prefix.
    """
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    total = hits_inf = hits_cap = 0
    for hashes in requests:
        total += len(hashes)
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        hits_inf += n
        n = 0
        for h in hashes:
            if h not in lru:
                break
            lru.move_to_end(h)
            n += 1
        hits_cap += n
        seen.update(hashes)
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    if not total:
        return 0.0, 0.0
    return hits_inf / total, hits_cap / total

"""Percentiles and the two hit-rate upper bounds the simulator reports."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


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

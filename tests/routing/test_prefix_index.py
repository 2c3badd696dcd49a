"""PrefixIndex: exact events, approximate mode, bounds, worker removal, tier, and agreement
with a brute-force reference on random data."""

from __future__ import annotations

import random

import pytest
from tusk.router.prefix_index import PrefixIndex


def reference_match(held: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out = {}
    for worker, blocks in held.items():
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        if n:
            out[worker] = n
    return out


def test_match_is_longest_consecutive_prefix_per_worker() -> None:
    idx = PrefixIndex()
    idx.apply_event("a", "stored", "device", [1, 2, 3])
    idx.apply_event("b", "stored", "device", [1, 2, 4])
    idx.apply_event("c", "stored", "device", [2, 3])  # no first block: no match at all
    assert idx.match([1, 2, 3, 9]) == {"a": 3, "b": 2}
    assert idx.match([7]) == {}
    assert idx.match([]) == {}
    assert idx.match([1, 2, 3]) == {"a": 3, "b": 2}


def test_device_and_host_both_count_and_are_removed_independently() -> None:
    idx = PrefixIndex(exact_match=True)
    idx.apply_event("a", "stored", "device", [1, 2])
    idx.apply_event("a", "stored", "host", [2, 3])
    assert idx.match([1, 2, 3]) == {"a": 3}
    idx.apply_event("a", "removed", "device", [2])  # still on host
    assert idx.match([1, 2, 3]) == {"a": 3}
    idx.apply_event("a", "removed", "host", [2])
    assert idx.match([1, 2, 3]) == {"a": 1}
    # the default search assumes prefix closure: this hole (2 gone, 3 kept) is overstated
    assert idx.match_closed([1, 2, 3]) == {"a": 3}
    idx.apply_event("a", "cleared", "host", [])
    assert idx.match([1, 2, 3]) == {"a": 1}
    idx.apply_event("a", "cleared", "device", [])
    assert idx.match([1]) == {}
    assert len(idx) == 0


def test_events_are_idempotent_and_validated() -> None:
    idx = PrefixIndex()
    idx.apply_event("a", "stored", "device", [1, 2])
    idx.apply_event("a", "stored", "device", [1, 2])
    idx.apply_event("a", "removed", "device", [5])
    assert idx.worker_blocks("a") == 2
    with pytest.raises(ValueError, match="event kind"):
        idx.apply_event("a", "evicted", "device", [1])
    with pytest.raises(ValueError, match="medium"):
        idx.apply_event("a", "stored", "disk", [1])
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks_per_worker=0)


def test_tier_match_and_tier_events() -> None:
    idx = PrefixIndex(max_tier_blocks=3)
    idx.apply_event("w", "stored", "tier", [1, 2, 3])
    assert idx.tier_match([1, 2, 3, 4]) == 3
    assert idx.match([1]) == {}  # the tier is not a worker
    idx.apply_event("w", "stored", "tier", [4])  # evicts the oldest (1)
    assert idx.tier_blocks == 3
    assert idx.tier_match([1, 2]) == 0
    idx.apply_event("w", "removed", "tier", [3])
    assert idx.tier_match([2, 3]) == 1
    idx.apply_event("w", "cleared", "tier", [])
    assert idx.tier_blocks == 0


def test_approximate_mode_is_bounded_lru_per_worker() -> None:
    idx = PrefixIndex(max_blocks_per_worker=4)
    idx.record_route("a", [1, 2, 3])  # inserted tail first: 3 is the oldest
    idx.record_route("a", [1, 9])
    assert idx.match([1, 2, 3]) == {"a": 3}
    idx.record_route("a", [7])  # 5 blocks > 4: evict LRU, the old chain's tail (3)
    assert idx.worker_blocks("a") == 4
    assert not idx.holds("a", 3)
    assert idx.match([1, 2, 3]) == {"a": 2}
    idx.record_route("a", [8])  # next goes 2, still leaving a usable prefix
    assert idx.match([1, 2, 3]) == {"a": 1}


def test_memory_stays_bounded_under_churn() -> None:
    idx = PrefixIndex(max_blocks_per_worker=100)
    for i in range(50):
        idx.apply_event(f"w{i % 5}", "stored", "device", list(range(i * 1000, i * 1000 + 80)))
    assert all(idx.worker_blocks(f"w{i}") <= 100 for i in range(5))
    assert len(idx) <= 500


def test_remove_worker_clears_its_blocks_and_reuses_the_slot() -> None:
    idx = PrefixIndex()
    idx.apply_event("a", "stored", "device", [1, 2])
    idx.apply_event("b", "stored", "device", [1])
    idx.remove_worker("a")
    idx.remove_worker("nobody")
    assert idx.match([1, 2]) == {"b": 1}
    assert idx.workers == ["b"]
    idx.apply_event("c", "stored", "device", [1, 2])  # takes a's old slot
    assert idx.match([1, 2]) == {"b": 1, "c": 2}


def test_exact_mode_agrees_with_brute_force_even_with_holes() -> None:
    rng = random.Random(7)
    idx = PrefixIndex(exact_match=True)
    held: dict[str, set[int]] = {f"w{i}": set() for i in range(70)}  # > 64: bitsets past one word
    chains = [[rng.getrandbits(64) for _ in range(12)] for _ in range(30)]
    for _ in range(3000):
        worker = rng.choice(list(held))
        chain = rng.choice(chains)
        cut = rng.randint(1, len(chain))
        if rng.random() < 0.7:
            idx.apply_event(worker, "stored", "device", chain[:cut])
            held[worker].update(chain[:cut])
        else:
            gone = rng.sample(chain, 3)
            idx.apply_event(worker, "removed", "device", gone)
            held[worker].difference_update(gone)
    for chain in chains:
        assert idx.match(chain) == reference_match(held, chain)


@pytest.mark.parametrize("exact", [False, True])
def test_both_modes_agree_with_brute_force_on_prefix_closed_histories(exact: bool) -> None:
    """Engines evict chain tails first, so workers hold prefixes of chains; there the
    bisection search must be exact too."""
    rng = random.Random(11)
    idx = PrefixIndex(exact_match=exact)
    held: dict[str, set[int]] = {f"w{i}": set() for i in range(70)}
    depth: dict[tuple[str, int], int] = {}
    chains = [[rng.getrandbits(64) for _ in range(40)] for _ in range(25)]
    for _ in range(3000):
        worker = rng.choice(list(held))
        c = rng.randrange(len(chains))
        chain = chains[c]
        have = depth.get((worker, c), 0)
        new = rng.randint(0, len(chain)) if rng.random() < 0.6 else rng.randint(0, have)
        if new > have:
            idx.apply_event(worker, "stored", "device", chain[have:new])
        elif new < have:
            idx.apply_event(worker, "removed", "device", chain[new:have])
        depth[(worker, c)] = new
        held[worker].difference_update(chain)
        held[worker].update(chain[:new])
    for chain in chains:
        for cut in (1, 5, 17, 40):
            probe = chain[:cut] + [rng.getrandbits(64)]
            assert idx.match(probe) == reference_match(held, probe)
            assert idx.match_exact(probe) == idx.match_closed(probe)

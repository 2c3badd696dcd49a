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


# ----------------------------------------------------------------------------- claims
def lcp(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def clocked(**kw: object) -> tuple[PrefixIndex, list[float]]:
    now = [0.0]
    idx = PrefixIndex(**kw)  # type: ignore[arg-type]
    idx.clock = lambda: now[0]
    return idx, now


@pytest.mark.parametrize("exact", [False, True])
def test_claims_agree_with_brute_force(exact: bool) -> None:
    """Claims, KV events, worker removal and time, against a reference where a live claim
    covers its whole chain and a worker's depth is the larger of held and claimed. Chains grow
    from a few roots (shared prefixes) and cross several claim grid marks."""
    rng = random.Random(5)
    idx, now = clocked(exact_match=exact)
    counter = iter(range(1, 10**9))
    chains = [[next(counter) for _ in range(rng.randint(1, 110))] for _ in range(6)]
    for _ in range(40):  # branches off the roots: shared prefixes, as chained hashes give
        base = rng.choice(chains)
        chains.append(base[: rng.randint(1, len(base))] + [next(counter) for _ in range(rng.randint(1, 60))])
    depth_of = {h: i for chain in chains for i, h in enumerate(chain)}
    workers = [f"w{i}" for i in range(6)]
    held: dict[str, set[int]] = {w: set() for w in workers}
    claims: list[list] = []  # [worker, chain, deadline, alive]

    def reference(probe: list[int]) -> dict[str, int]:
        out = {}
        for w in workers:
            d = 0
            while d < len(probe) and probe[d] in held[w]:
                d += 1
            for cw, chain, deadline, alive in claims:
                if alive and cw == w and deadline > now[0]:
                    d = max(d, lcp(probe, chain))
            if d:
                out[w] = d
        return out

    for step in range(700):
        w = rng.choice(workers)
        chain = rng.choice(chains)
        cut = rng.randint(1, len(chain))
        op = rng.random()
        if op < 0.4:
            ttl = rng.uniform(0.5, 3.0)
            idx.claim(w, chain[:cut], ttl_s=ttl)
            if not all(h in held[w] for h in chain[:cut]):  # a fully held chain needs no claim
                claims.append([w, tuple(chain[:cut]), now[0] + ttl, True])
        elif op < 0.6:
            idx.apply_event(w, "stored", "device", chain[:cut])
            held[w].update(chain[:cut])
            for c in claims:  # a stored event holding a claim's last block confirms it
                if c[0] == w and c[1][-1] in held[w] and c[1][-1] in chain[:cut]:
                    c[3] = False
        elif op < 0.75:  # evict every block deeper than `cut` (engines keep prefixes)
            gone = [h for h in held[w] if depth_of[h] >= cut]
            idx.apply_event(w, "removed", "device", gone)
            held[w].difference_update(gone)
        elif op < 0.78:
            idx.apply_event(w, "cleared", "device", [])
            held[w].clear()
            for c in claims:
                c[3] = c[3] and c[0] != w
        elif op < 0.8:
            idx.remove_worker(w)
            held[w].clear()
            for c in claims:
                c[3] = c[3] and c[0] != w
        else:
            now[0] += rng.uniform(0.0, 0.6)
        probe = rng.choice(chains)[: rng.randint(1, 110)] + [next(counter)] * rng.randint(0, 1)
        assert idx.match(probe) == reference(probe), step
    idx.expire_claims()
    live = sum(1 for c in claims if c[3] and c[2] > now[0])
    assert idx.pending_claims >= live


def test_expired_claims_never_count_and_are_swept_in_bounded_batches() -> None:
    idx, now = clocked()
    chains = [[i * 1000 + j for j in range(100)] for i in range(50)]
    for chain in chains:
        idx.claim("a", chain, ttl_s=1.0)
    assert idx.match(chains[7][:40]) == {"a": 40}
    assert idx.worker_blocks("a") == 50 * 100
    now[0] = 1.5
    assert idx.match(chains[7]) == {}  # expired: not counted although not swept yet
    assert 45 <= idx.pending_claims < 50  # each call sweeps only a few records
    idx.claim("b", chains[0][:10], ttl_s=1.0)
    assert idx.match(chains[0]) == {"b": 10}
    assert idx.pending_claims > 40
    for _ in range(100):  # every match sweeps: the backlog drains without a full pass
        idx.match([1])
    assert idx.pending_claims == 1
    assert idx.worker_blocks("a") == 0 and idx.worker_blocks("b") == 10
    now[0] = 3.0
    idx.expire_claims()
    assert idx.pending_claims == 0
    assert not idx._claim_marks and not idx._claim_ends  # nothing left behind


def test_a_stored_event_confirms_a_claim_and_later_removals_then_count() -> None:
    idx, now = clocked()
    chain = list(range(1, 81))
    idx.claim("a", chain, ttl_s=2.0)
    idx.claim("b", chain, ttl_s=2.0)
    idx.apply_event("a", "removed", "device", chain[40:])  # unconfirmed: the claim still holds
    assert idx.match(chain) == {"a": 80, "b": 80}
    idx.apply_event("a", "stored", "device", chain)  # confirms a's claim, not b's
    assert idx.worker_blocks("a") == 80  # held now, not counted twice
    idx.apply_event("a", "removed", "device", chain[50:])
    assert idx.match(chain) == {"a": 50, "b": 80}
    now[0] = 2.5
    assert idx.match(chain) == {"a": 50}
    idx.claim("a", chain[:50], ttl_s=2.0)  # a already holds all of it: nothing to claim
    assert idx.pending_claims <= 2 and idx.worker_blocks("a") == 50


def test_claiming_the_same_chain_again_renews_it() -> None:
    idx, now = clocked()
    chain = list(range(1, 40))
    idx.claim("a", chain, ttl_s=2.0)
    now[0] = 1.5
    idx.claim("a", chain, ttl_s=2.0)
    assert idx.pending_claims == 1 and idx.worker_blocks("a") == 39
    now[0] = 3.0
    assert idx.match(chain) == {"a": 39}
    now[0] = 3.6
    assert idx.match(chain) == {}
    idx.expire_claims()
    assert idx.pending_claims == 0 and idx.worker_blocks("a") == 0


def test_removing_a_worker_or_clearing_drops_its_claims() -> None:
    idx, now = clocked()
    chain = list(range(1, 70))
    idx.claim("a", chain, ttl_s=2.0)
    idx.claim("b", chain[:20], ttl_s=2.0)
    idx.claim("c", chain[:5], ttl_s=2.0)
    idx.remove_worker("a")
    assert idx.match(chain) == {"b": 20, "c": 5}
    idx.apply_event("d", "stored", "device", chain[:3])  # takes a's old slot
    assert idx.match(chain) == {"b": 20, "c": 5, "d": 3}  # and none of a's claims
    idx.apply_event("b", "cleared", "host", [])
    assert idx.match(chain) == {"c": 5, "d": 3}
    assert idx.worker_blocks("b") == 0
    now[0] = 5.0
    idx.expire_claims()
    assert idx.pending_claims == 0 and not idx._claim_marks


def test_many_claims_under_one_mark_are_never_overstated() -> None:
    """A hot prefix: 200 live claims of one worker share their first blocks. The newest are
    compared exactly; past the scan limit a depth may be understated, never overstated."""
    idx, _ = clocked()
    shared = [1, 2, 3]
    chains = [shared + [1000 * i + j for j in range(1, 20)] for i in range(200)]
    for chain in chains:
        idx.claim("a", chain, ttl_s=2.0)
    assert idx.match(chains[-1] + [5]) == {"a": 22}
    for chain in (chains[0], chains[100]):
        assert 3 <= idx.match(chain)["a"] <= 22
    assert idx.match(shared + [7]) == {"a": 3}

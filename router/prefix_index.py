"""Where each KV block lives: on which workers (device or host memory) and in the shared tier.

The router asks one question per request: "for each worker, how many of this request's leading
blocks does it already hold?". Block hashes are chained (``tusk.hashing``), so a block is only
reusable when every block before it is too; the answer is therefore a longest *consecutive*
prefix length per worker.

Layout, chosen so that a lookup costs a handful of dict probes and integer ANDs, no matter
how many workers exist:

* ``_holders``: block hash -> bitset (a Python int) of worker slots holding it locally.
  ``match`` bisects over the request's blocks (under prefix closure, see ``match_closed``):
  O(distinct match depths x log n) probes. ``match_exact`` walks every block instead, ANDing
  bitsets until the candidate set empties. A cold request costs one probe either way.
* ``_blocks[slot]``: an ``OrderedDict`` hash -> medium bits in LRU order, per worker. It lets
  us remove a worker in O(its blocks), bounds memory per worker (LRU eviction past
  ``max_blocks_per_worker``) and, in approximate mode, ages out guesses.
* ``_tier``: an ``OrderedDict`` of hashes the shared tier holds, bounded the same way.

Exact mode is fed by the workers' KV events (``apply_event``). ``claim`` runs ahead of them:
a routing decision marks the request's blocks as held by the chosen worker for ``ttl_s``
(llm-d pre-inserts routed prefixes for about 2 s) so the next turn of a conversation arriving
while this prefill runs already sees the match. A claimed block turns into a real one when the
worker's ``stored`` event arrives; an unconfirmed claim disappears when its time is up. Approximate mode (events off)
calls ``record_route`` on each routing decision: the chosen worker will hold the request's
blocks soon, and the per-worker LRU bound plays the part of the worker's own eviction.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

EventKind = Literal["stored", "removed", "cleared"]
Medium = Literal["device", "host", "tier"]

_MEDIUM_BITS = {"device": 1, "host": 2}
_CLAIM_BIT = 4  # claimed by a routing decision, not yet confirmed by a KV event
EVENT_KINDS = ("stored", "removed", "cleared")
MEDIA = ("device", "host", "tier")


class PrefixIndex:
    """Block locations for one model; see the module docstring for the layout."""

    def __init__(
        self,
        max_blocks_per_worker: int = 1 << 20,
        max_tier_blocks: int = 1 << 22,
        exact_match: bool = False,
    ) -> None:
        if max_blocks_per_worker < 1 or max_tier_blocks < 1:
            raise ValueError("index capacities must be >= 1")
        self.max_blocks_per_worker = max_blocks_per_worker
        self.max_tier_blocks = max_tier_blocks
        self.exact_match = exact_match
        self._holders: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._slot_ids: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._blocks: dict[int, OrderedDict[int, int]] = {}
        self._tier: OrderedDict[int, None] = OrderedDict()
        self._claims: deque[tuple[float, str, Sequence[int]]] = deque()
        # seconds; the simulator swaps in its virtual clock
        self.clock: Callable[[], float] = time.monotonic

    # ----------------------------------------------------------------- bookkeeping
    def _slot(self, worker_id: str) -> int:
        slot = self._slots.get(worker_id)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slots)
            self._slots[worker_id] = slot
            self._slot_ids[slot] = worker_id
            self._blocks[slot] = OrderedDict()
        return slot

    def _add(self, slot: int, h: int, bits: int) -> None:
        blocks = self._blocks[slot]
        old = blocks.get(h)
        if old is None:
            blocks[h] = bits
            self._holders[h] = self._holders.get(h, 0) | (1 << slot)
            if len(blocks) > self.max_blocks_per_worker:
                victim, _ = blocks.popitem(last=False)
                self._drop_holder(victim, slot)
        else:
            # a real store confirms a claim: the block no longer expires with it
            blocks[h] = (old | bits) & ~_CLAIM_BIT if bits != _CLAIM_BIT else old | bits
            blocks.move_to_end(h)

    def _drop_holder(self, h: int, slot: int) -> None:
        mask = self._holders.get(h, 0) & ~(1 << slot)
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)

    def _remove(self, slot: int, h: int, bits: int) -> None:
        blocks = self._blocks[slot]
        old = blocks.get(h)
        if old is None:
            return
        left = old & ~bits
        if left:
            blocks[h] = left
        else:
            del blocks[h]
            self._drop_holder(h, slot)

    # ----------------------------------------------------------------- updates
    def apply_event(self, worker_id: str, kind: str, medium: str, hashes: Iterable[int]) -> None:
        """Apply one KV event. ``medium="tier"`` events describe the shared tier; ``worker_id``
        is then only the reporter. Events are idempotent: storing a held block or removing a
        missing one is a no-op (events may be replayed after a reconnect)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown KV event kind {kind!r}; expected one of {EVENT_KINDS}")
        if medium not in MEDIA:
            raise ValueError(f"unknown KV medium {medium!r}; expected one of {MEDIA}")
        if medium == "tier":
            self._apply_tier(kind, hashes)
            return
        bits = _MEDIUM_BITS[medium]
        slot = self._slot(worker_id)
        if kind == "stored":
            for h in hashes:
                self._add(slot, h, bits)
        elif kind == "removed":
            for h in hashes:
                self._remove(slot, h, bits)
        else:  # cleared: everything this worker held in that medium (and its claims)
            bits |= _CLAIM_BIT
            for h in [h for h, b in self._blocks[slot].items() if b & bits]:
                self._remove(slot, h, bits)

    def _apply_tier(self, kind: str, hashes: Iterable[int]) -> None:
        tier = self._tier
        if kind == "stored":
            for h in hashes:
                if h in tier:
                    tier.move_to_end(h)
                else:
                    tier[h] = None
                    if len(tier) > self.max_tier_blocks:
                        tier.popitem(last=False)
        elif kind == "removed":
            for h in hashes:
                tier.pop(h, None)
        else:
            tier.clear()

    def record_route(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Approximate mode: assume ``worker_id`` now holds these blocks (it is about to compute
        or receive them). The per-worker LRU bound stands in for the worker's eviction."""
        slot = self._slot(worker_id)
        # _add(slot, h, 1) inlined: the HTTP proxy path runs this on every request, for every block
        blocks = self._blocks[slot]
        holders = self._holders
        bit = 1 << slot
        get = blocks.get
        touch = blocks.move_to_end
        for h in reversed(hashes):  # tail first: the prefix ends most recent, evicted last
            old = get(h)
            if old is None:
                blocks[h] = 1
                holders[h] = holders.get(h, 0) | bit
            else:
                if old != 1:
                    blocks[h] = (old | 1) & ~_CLAIM_BIT  # a route confirms a claim
                touch(h)
        while len(blocks) > self.max_blocks_per_worker:
            self._drop_holder(blocks.popitem(last=False)[0], slot)

    def claim(self, worker_id: str, hashes: Sequence[int], ttl_s: float) -> None:
        """The router just sent these blocks' request to ``worker_id``: count them as held there
        until the worker's KV events confirm them or ``ttl_s`` passes (see the module doc)."""
        if not hashes:
            return
        self.expire_claims()
        slot = self._slot(worker_id)
        # _add inlined: this runs on every routing decision, for up to a few hundred blocks
        blocks = self._blocks[slot]
        holders = self._holders
        bit = 1 << slot
        get = blocks.get
        for h in reversed(hashes):  # tail first, like record_route
            old = get(h)
            if old is None:
                blocks[h] = _CLAIM_BIT
                holders[h] = holders.get(h, 0) | bit
            else:
                blocks[h] = old | _CLAIM_BIT
                blocks.move_to_end(h)
        while len(blocks) > self.max_blocks_per_worker:
            self._drop_holder(blocks.popitem(last=False)[0], slot)
        self._claims.append((self.clock() + ttl_s, worker_id, hashes))

    def expire_claims(self) -> None:
        """Drop the claims whose time is up and that no KV event confirmed."""
        claims = self._claims
        if not claims:
            return
        now = self.clock()
        while claims and claims[0][0] <= now:
            _, worker_id, hashes = claims.popleft()
            slot = self._slots.get(worker_id)
            if slot is None:
                continue
            blocks = self._blocks[slot]
            for h in hashes:
                b = blocks.get(h)
                if b is not None and b & _CLAIM_BIT:
                    self._remove(slot, h, _CLAIM_BIT)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left (scaled down, crashed, unhealthy for too long)."""
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            return
        for h in self._blocks.pop(slot):
            self._drop_holder(h, slot)
        del self._slot_ids[slot]
        self._free_slots.append(slot)

    # ----------------------------------------------------------------- queries
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Longest consecutive-prefix match, in blocks, per worker (device + host). Workers
        with no match are absent (unconfirmed claims count until they expire). Uses the
        prefix-closed search unless ``exact_match``."""
        if self._claims:
            self.expire_claims()
        if self.exact_match:
            return self.match_exact(hashes)
        return self.match_closed(hashes)

    def match_exact(self, hashes: Sequence[int]) -> dict[str, int]:
        """Walk every block, ANDing bitsets until no candidate is left: exact even when a
        worker has holes in a chain, but one dict probe per matched block (memory-bound:
        ~0.1-0.3 us each for a million-entry index)."""
        result: dict[str, int] = {}
        n = len(hashes)
        if n == 0:
            return result
        get = self._holders.get
        cand = get(hashes[0], 0)
        depth = 1
        while cand and depth < n:
            nxt = cand & get(hashes[depth], 0)
            if nxt != cand:
                self._emit(cand ^ nxt, depth, result)
            cand = nxt
            depth += 1
        if cand:
            self._emit(cand, depth, result)
        return result

    def match_closed(self, hashes: Sequence[int]) -> dict[str, int]:
        """Bisection under prefix closure: a worker holding block ``i`` of a chain holds the
        blocks before it. Engines evict chain tails first (tusk's block manager releases tail
        blocks first, as vLLM does) and this index inserts approximate routes tail-first, so
        closure holds except after rare out-of-order evictions, where a worker's match can be
        overstated (the worker then recomputes the missing blocks: a costlier request, never
        a wrong answer). Costs O(distinct depths x log n) probes instead of O(n)."""
        result: dict[str, int] = {}
        n = len(hashes)
        if n == 0:
            return result
        get = self._holders.get
        remaining = get(hashes[0], 0)
        hi = n  # every remaining worker matches at most hi blocks
        while remaining:
            held = get(hashes[hi - 1], 0) & remaining
            if not held:
                lo = 1  # block 0 is held by all of remaining; block hi-1 by none
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if get(hashes[mid - 1], 0) & remaining:
                        lo = mid
                    else:
                        hi = mid
                hi = lo
                held = get(hashes[hi - 1], 0) & remaining
            self._emit(held, hi, result)
            remaining ^= held
            hi -= 1
        return result

    def _emit(self, mask: int, depth: int, result: dict[str, int]) -> None:
        ids = self._slot_ids
        while mask:
            low = mask & -mask
            result[ids[low.bit_length() - 1]] = depth
            mask ^= low

    def tier_match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks the shared tier holds."""
        tier = self._tier
        n = 0
        for h in hashes:
            if h not in tier:
                break
            n += 1
        return n

    def worker_blocks(self, worker_id: str) -> int:
        slot = self._slots.get(worker_id)
        return 0 if slot is None else len(self._blocks[slot])

    def holds(self, worker_id: str, h: int) -> bool:
        slot = self._slots.get(worker_id)
        return slot is not None and h in self._blocks[slot]

    @property
    def workers(self) -> list[str]:
        return list(self._slots)

    @property
    def tier_blocks(self) -> int:
        return len(self._tier)

    def __len__(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._holders)

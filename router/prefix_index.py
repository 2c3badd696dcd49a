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
a routing decision marks the request's chain as held by the chosen worker for ``ttl_s``
(llm-d pre-inserts routed prefixes for about 2 s) so the next turn of a conversation arriving
while this prefill runs already sees the match. It runs on every decision, so a claim is one
record (worker, the request's whole chain, deadline) rather than an entry per block: per-block
writes into a million-entry index cost ~0.2 us each, ~100 us for a 320-block claim and its
expiry. Claims live beside the held blocks:

* ``_claim_marks``: the hash at every ``CLAIM_GRID``-th position of a claimed chain -> the
  records listed there. With chained hashes a claim covers a request up to the two chains'
  longest common prefix, so ``match`` bisects the request's grid positions for each worker's
  deepest claimed mark, then compares hashes against that mark's records (at most
  ``_CLAIM_SCAN`` live ones: past that a depth can be understated by < ``CLAIM_GRID``, never
  overstated). A worker's match is the larger of its held and its claimed depth.
* ``_claim_queue``: records in deadline order. Every record carries its deadline, so an
  expired claim never counts; ``claim`` and ``match`` unlist a few expired records per call
  (bounded work per decision, draining faster than one claim per decision fills it).
* ``_claim_ends``: a chain's last hash -> its records. A ``stored`` event holding a claim's
  last block confirms it (engines store a prompt in order: the chain is now held) and drops the
  record. ``cleared`` and ``remove_worker`` drop the worker's claims; ``removed`` leaves them
  (the routed request will hold its blocks while it runs).

Approximate mode (events off) calls ``record_route`` on each routing decision: the chosen
worker will hold the request's blocks soon, and the per-worker LRU bound plays the part of the
worker's own eviction.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

EventKind = Literal["stored", "removed", "cleared"]
Medium = Literal["device", "host", "tier"]

_MEDIUM_BITS = {"device": 1, "host": 2}
EVENT_KINDS = ("stored", "removed", "cleared")
MEDIA = ("device", "host", "tier")
CLAIM_GRID = 32  # a claim record is listed under every 32nd hash of its chain
# Expired claim records swept per ``claim`` / ``match`` call: bounded work per decision that
# still drains records three times as fast as one claim per decision adds them.
_CLAIM_SWEEP = 2
_MATCH_SWEEP = 1
_CLAIM_SCAN = 64  # newest live records compared per mark when refining claimed depths
_DEAD = float("-inf")  # the deadline of a confirmed or dropped claim


class _Claim:
    """One routing decision's claim: ``slot`` will hold ``hashes`` (the request's chain from
    block 0) until ``deadline``. ``due`` orders the sweep queue (a renewed claim moves back);
    ``blocks`` is what it adds to ``worker_blocks`` (0 once confirmed, dropped or swept)."""

    __slots__ = ("deadline", "due", "slot", "hashes", "blocks")

    def __init__(self, deadline: float, slot: int, hashes: tuple[int, ...], blocks: int) -> None:
        self.deadline = self.due = deadline
        self.slot = slot
        self.hashes = hashes
        self.blocks = blocks


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
        self._claim_marks: dict[int, list[_Claim]] = {}
        self._claim_ends: dict[int, list[_Claim]] = {}  # a chain's last hash -> its claims
        self._claim_queue: deque[_Claim] = deque()  # in deadline order (one TTL per policy)
        self._claimed_blocks: dict[int, int] = {}  # slot -> claimed blocks beyond its held prefix
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
            blocks[h] = old | bits
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
            if not isinstance(hashes, (list, tuple)):
                hashes = list(hashes)
            for h in hashes:
                self._add(slot, h, bits)
            if self._claim_ends:
                self._confirm_claims(slot, hashes)
        elif kind == "removed":
            for h in hashes:
                self._remove(slot, h, bits)
        else:  # cleared: everything this worker held in that medium (and its claims)
            for h in [h for h, b in self._blocks[slot].items() if b & bits]:
                self._remove(slot, h, bits)
            self._drop_worker_claims(slot)

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
                    blocks[h] = old | 1
                touch(h)
        while len(blocks) > self.max_blocks_per_worker:
            self._drop_holder(blocks.popitem(last=False)[0], slot)

    def claim(self, worker_id: str, hashes: Sequence[int], ttl_s: float) -> None:
        """The router just sent a request with these blocks (its whole chain, from block 0) to
        ``worker_id``: count them as held there until the worker's ``stored`` event confirms
        them or ``ttl_s`` passes. One record and ``len(hashes) / CLAIM_GRID`` dict writes, plus
        a bounded sweep of expired records (see the module doc)."""
        n = len(hashes)
        if not n:
            return
        now = self.clock()
        if self._claim_queue:
            self._sweep_claims(now, _CLAIM_SWEEP)
        slot = self._slot(worker_id)
        held = self._held_depth(slot, hashes)
        if held >= n:
            return  # it already holds the whole chain
        deadline = now + ttl_s
        last = hashes[-1]
        ends = self._claim_ends.get(last)
        if ends is not None:
            for c in ends:  # chained hashes: the same last hash is the same chain
                if c.slot == slot and c.deadline > now and len(c.hashes) == n:
                    c.deadline = max(c.deadline, deadline)  # claimed again: renew
                    return
        c = _Claim(deadline, slot, tuple(hashes), n - held)
        marks = self._claim_marks
        for p in range(0, n, CLAIM_GRID):
            records = marks.get(hashes[p])
            if records is None:
                marks[hashes[p]] = [c]
            else:
                records.append(c)
        if ends is None:
            self._claim_ends[last] = [c]
        else:
            ends.append(c)
        self._claimed_blocks[slot] = self._claimed_blocks.get(slot, 0) + c.blocks
        self._claim_queue.append(c)

    def _held_depth(self, slot: int, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` the worker holds (bisection under prefix closure). It
        probes ``_holders``, whose entries for this request the decision's ``match`` just
        brought into the CPU cache, rather than the worker's own block map."""
        get = self._holders.get
        bit = 1 << slot
        if self.exact_match:
            depth = 0
            for h in hashes:
                if not get(h, 0) & bit:
                    break
                depth += 1
            return depth
        n = len(hashes)
        if not get(hashes[0], 0) & bit:
            return 0
        if get(hashes[n - 1], 0) & bit:
            return n
        lo, hi = 1, n  # it holds the first lo blocks and not the first hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if get(hashes[mid - 1], 0) & bit:
                lo = mid
            else:
                hi = mid
        return lo

    def expire_claims(self) -> None:
        """Sweep every expired claim record now (``match`` and ``claim`` sweep a few per call;
        an expired claim never counts either way: this only frees its memory)."""
        if self._claim_queue:
            self._sweep_claims(self.clock(), len(self._claim_queue))

    @property
    def pending_claims(self) -> int:
        """Claim records in memory: live, or expired and not yet swept."""
        return len(self._claim_queue)

    def _sweep_claims(self, now: float, limit: int) -> None:
        queue = self._claim_queue
        while queue and limit > 0:
            c = queue[0]
            if c.due > now:
                return
            queue.popleft()
            limit -= 1
            if c.deadline > now:  # renewed since it was queued
                c.due = c.deadline
                queue.append(c)
            elif c.deadline != _DEAD:  # (a dead record is already unlisted)
                self._unlist_claim(c)

    def _unlist_claim(self, c: _Claim) -> None:
        """Take a record out of the marks and the chain ends, and out of ``worker_blocks``."""
        hashes = c.hashes
        marks = self._claim_marks
        for p in range(0, len(hashes), CLAIM_GRID):
            records = marks[hashes[p]]
            if len(records) == 1:
                del marks[hashes[p]]
            elif records[0] is c:
                del records[0]
            else:
                records.remove(c)
        ends = self._claim_ends.get(hashes[-1])
        if ends:
            ends.remove(c)
            if not ends:
                del self._claim_ends[hashes[-1]]
        if c.blocks:
            left = self._claimed_blocks.get(c.slot, 0) - c.blocks
            if left > 0:
                self._claimed_blocks[c.slot] = left
            else:
                self._claimed_blocks.pop(c.slot, None)
            c.blocks = 0

    def _kill_claim(self, c: _Claim) -> None:
        if c.deadline != _DEAD:
            self._unlist_claim(c)
            c.deadline = _DEAD  # the sweep queue drops it when it comes due

    def _confirm_claims(self, slot: int, hashes: Sequence[int]) -> None:
        """A ``stored`` event holding a claim's last block confirms the claim: the worker now
        holds the chain (engines store a prompt's blocks in order), so the record goes."""
        ends = self._claim_ends
        for h in hashes:
            claims = ends.get(h)
            if claims:
                for c in [c for c in claims if c.slot == slot]:
                    self._kill_claim(c)

    def _drop_worker_claims(self, slot: int) -> None:
        for c in self._claim_queue:
            if c.slot == slot:
                self._kill_claim(c)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left (scaled down, crashed, unhealthy for too long)."""
        slot = self._slots.pop(worker_id, None)
        if slot is None:
            return
        if self._claim_queue:
            self._drop_worker_claims(slot)
        for h in self._blocks.pop(slot):
            self._drop_holder(h, slot)
        del self._slot_ids[slot]
        self._free_slots.append(slot)

    # ----------------------------------------------------------------- queries
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Longest consecutive-prefix match, in blocks, per worker (device + host). Workers
        with no match are absent (unconfirmed claims count until they expire). Uses the
        prefix-closed search unless ``exact_match``."""
        if self.exact_match:
            return self.match_exact(hashes)
        return self.match_closed(hashes)

    def match_exact(self, hashes: Sequence[int]) -> dict[str, int]:
        """Walk every block, ANDing bitsets until no candidate is left: exact even when a
        worker has holes in a chain, but one dict probe per matched block (memory-bound:
        ~0.1-0.3 us each for a million-entry index). Live claims raise a worker's depth to
        what they cover, as in ``match_closed``."""
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
        if self._claim_queue:
            self._add_claimed(hashes, result)
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
        if self._claim_queue:
            self._add_claimed(hashes, result)
        return result

    def _add_claimed(self, hashes: Sequence[int], result: dict[str, int]) -> None:
        """Raise each worker's depth in ``result`` to what its live claims cover. A claim covers
        the longest common prefix of its chain and the request's, so the claimed marks among
        the request's grid positions are prefix-closed per worker: bisect them like
        ``match_closed`` does blocks, then compare hashes past each worker's deepest mark."""
        now = self.clock()
        self._sweep_claims(now, _MATCH_SWEEP)
        marks = self._claim_marks
        if not marks:
            return
        grid = CLAIM_GRID
        n = len(hashes)

        def live(p: int) -> int:  # worker slots with a live claim listed under hashes[p]
            bits = 0
            for c in marks.get(hashes[p], ()):
                if c.deadline > now:
                    bits |= 1 << c.slot
            return bits

        remaining = live(0)
        hi = (n - 1) // grid + 1  # every remaining worker's claims reach at most hi marks
        ids = self._slot_ids
        while remaining:
            held = live((hi - 1) * grid) & remaining
            if not held:
                lo = 1
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if live((mid - 1) * grid) & remaining:
                        lo = mid
                    else:
                        hi = mid
                hi = lo
                held = live((hi - 1) * grid) & remaining
            p = (hi - 1) * grid
            top = min(n, p + grid)  # the next mark is not claimed: depth <= top
            remaining ^= held
            hi -= 1
            # a record only helps a worker if it agrees with the request past what is known
            best: dict[int, int] = {}
            while held:
                low = held & -held
                held ^= low
                slot = low.bit_length() - 1
                best[slot] = max(p + 1, result.get(ids[slot], 0))
            scanned = 0
            for c in reversed(marks[hashes[p]]):
                depth = best.get(c.slot)
                if depth is None or c.deadline <= now:
                    continue
                scanned += 1
                if scanned > _CLAIM_SCAN:
                    break
                chain = c.hashes
                end = min(top, len(chain))
                if end <= depth or chain[depth] != hashes[depth]:
                    continue
                if chain[end - 1] == hashes[end - 1]:
                    best[c.slot] = end
                    continue
                agree, differ = depth + 1, end  # the first `agree` blocks agree, not `differ`
                while differ - agree > 1:
                    mid = (agree + differ) // 2
                    if chain[mid - 1] == hashes[mid - 1]:
                        agree = mid
                    else:
                        differ = mid
                best[c.slot] = agree
            for slot, depth in best.items():
                worker = ids[slot]
                if result.get(worker, 0) < depth:
                    result[worker] = depth

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
        """Blocks the worker holds plus, per live claim, the claimed blocks beyond what it held
        when the claim was made (two claims sharing blocks both count them)."""
        slot = self._slots.get(worker_id)
        if slot is None:
            return 0
        if self._claim_queue:
            self._sweep_claims(self.clock(), len(self._claim_queue))
        return len(self._blocks[slot]) + self._claimed_blocks.get(slot, 0)

    def holds(self, worker_id: str, h: int) -> bool:
        """Whether a KV event or a recorded route put this block there (claims not included)."""
        slot = self._slots.get(worker_id)
        return slot is not None and h in self._blocks[slot]

    @property
    def workers(self) -> list[str]:
        return list(self._slots)

    @property
    def tier_blocks(self) -> int:
        return len(self._tier)

    def __len__(self) -> int:
        """Distinct blocks held by at least one worker (claims not included)."""
        return len(self._holders)

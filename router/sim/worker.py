"""A modeled worker: a prefill FIFO and a decode batch sharing engine steps, plus an LRU KV cache.

Time advances in *segments* during which the batch composition is fixed: ``n`` running decodes
and a prefill chunk of ``chunk`` tokens per step for the head of the prefill queue. Within a
segment the worker is treated as a fluid: every running request gains ``dt / step_s`` tokens and
the head prefill ``chunk * dt / step_s`` tokens. A segment ends at the next decode completion,
prefill completion or tier fetch completion (scheduled as an event), or earlier when something
arrives (the simulator calls ``advance`` then ``replan``). This is exact for step-synchronous
batching up to the fractional step at each boundary, and costs O(log n) per event instead of one
event per token or per step.

Decode completions use a "virtual step clock" ``v`` (decode tokens produced per running request
since the worker started): a request admitted at ``v0`` with ``k`` tokens left finishes at
``v0 + k``, so one heap gives the next completion without touching every running request.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tusk.router.load_account import LoadReportView
from tusk.router.policies.base import RequestOutcome, RoutingDecision, WorkerState
from tusk.router.sim.profile import WorkerProfile
from tusk.router.sim.trace import TraceRequest

from tusk.config import Role

if TYPE_CHECKING:
    from tusk.router.sim.cluster import Simulator

EPS = 1e-6


@dataclass(eq=False)
class Job:
    """One request's life in the simulator."""

    idx: int
    req: TraceRequest
    decision: RoutingDecision | None = None
    kv_blocks: int = 0  # blocks it pins while prefilling/decoding (prompt + output)
    cached_blocks: int = 0  # local hits + tier fetches, model blocks
    cached_tokens: int = 0
    remaining: float = 0.0  # prefill tokens still to compute
    uncached: int = 0
    ready_at: float = 0.0  # tier fetch done
    prefill_start: float | None = None
    prefill_end: float | None = None
    decode_start: float | None = None
    finish: float | None = None
    handoff_s: float | None = None
    outcome: RequestOutcome | None = None
    ticket: object | None = None  # the router's LoadTicket (tusk.router.load_account)
    v_admit: float = 0.0
    ctx_admit: int = 0
    itl_samples: list[float] = field(default_factory=list)
    completions: int = 0


class SimWorker:
    def __init__(self, index: int, role: Role, profile: WorkerProfile, block_size: int, sim: Simulator):
        self.index = index
        self.worker_id = f"w{index:03d}-{role.value}"
        self.profile = profile
        self.block_size = block_size
        self.sim = sim
        self.capacity = profile.capacity_blocks(block_size)
        self.state = WorkerState(
            worker_id=self.worker_id,
            address=f"sim://{self.worker_id}",
            role=role,
            free_blocks=self.capacity,
            total_blocks=self.capacity,
            prefill_tokens_per_s=profile.prefill_tokens_per_s,
            decode_step_s=profile.step_overhead_s + profile.weights_read_s,
        )
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.fetching: list[tuple[float, int, Job]] = []
        self.ready: deque[Job] = deque()
        self.queued_tokens = 0.0
        self.decoding: list[tuple[float, int, Job]] = []  # (finish_v, idx, job)
        self.v = 0.0
        self.n = 0
        self.ctx_base = 0.0  # sum(ctx_admit - v_admit) over running requests
        self.pinned = 0
        self.seg_start = 0.0
        self.step = 0.0
        self.chunk = 0.0
        self.head: Job | None = None  # the prefill that gets this segment's chunk
        self.version = 0
        self.busy_s = 0.0
        self.decode_tokens = 0.0
        self.prefill_tokens = 0

    # ------------------------------------------------------------------ cache
    def lookup(self, hashes: list[int]) -> int:
        """Leading blocks held locally; touches them so they survive until used."""
        cache = self.cache
        n = 0
        for h in hashes:
            if h not in cache:
                break
            n += 1
        for i in range(n - 1, -1, -1):  # tail first, so the prefix is the most recent
            cache.move_to_end(hashes[i])
        return n

    def store(self, hashes: list[int]) -> None:
        """The blocks now hold KV: insert, evict LRU past capacity, emit KV events."""
        cache = self.cache
        stored: list[int] = []
        # tail first, as engines release blocks: the prefix stays most recent and evicts last
        for h in reversed(hashes):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                stored.append(h)
        removed: list[int] = []
        while len(cache) > self.capacity:
            removed.append(cache.popitem(last=False)[0])
        self.sim.kv_events(self.worker_id, stored, removed)

    # ------------------------------------------------------------------ arrivals
    def enqueue_prefill(self, job: Job, now: float, fetch_s: float) -> None:
        self.advance(now)
        job.ready_at = now + fetch_s
        self.queued_tokens += job.remaining
        if fetch_s > 0:
            heapq.heappush(self.fetching, (job.ready_at, job.idx, job))
        else:
            self.ready.append(job)
        self.replan(now)

    def admit_decode(self, job: Job, now: float) -> None:
        """Start decoding ``job`` here (its first token is already out)."""
        left = job.req.output_tokens - 1
        job.decode_start = now
        if left <= 0:
            self.pinned -= job.kv_blocks
            self.sim.finish(job, self, now)
            return
        job.v_admit = self.v
        job.ctx_admit = job.req.input_tokens + 1
        self.ctx_base += job.ctx_admit - self.v
        self.n += 1
        heapq.heappush(self.decoding, (self.v + left, job.idx, job))

    def receive_handoff(self, job: Job, now: float) -> None:
        self.advance(now)
        self.store(job.req.block_hashes)
        self.pinned += job.kv_blocks
        self.admit_decode(job, now)
        self.replan(now)

    # ------------------------------------------------------------------ time
    def advance(self, now: float) -> None:
        """Apply progress since the segment started, then settle what completed."""
        dt = now - self.seg_start
        if dt > 0 and self.step > 0:
            steps = dt / self.step
            self.busy_s += dt
            if self.n:
                self.v += steps
                self.decode_tokens += self.n * steps
                self.sim.itl_sample(self.step, self.n * steps)
            if self.head is not None and self.chunk:
                done = min(self.head.remaining, self.chunk * steps)
                self.head.remaining -= done
                self.queued_tokens -= done
        self.seg_start = now
        self._settle(now)

    def _settle(self, now: float) -> None:
        while self.decoding and self.decoding[0][0] <= self.v + EPS:
            _, _, job = heapq.heappop(self.decoding)
            self.n -= 1
            self.ctx_base -= job.ctx_admit - job.v_admit
            self.pinned -= job.kv_blocks
            self.sim.finish(job, self, now)
        if self.n == 0:
            self.ctx_base = 0.0
        head = self.head
        if head is not None and head.remaining <= EPS:
            self.queued_tokens -= head.remaining
            head.remaining = 0.0
            self.ready.popleft()
            self.head = None
            head.prefill_end = now
            self.prefill_tokens += head.uncached
            self.store(head.req.block_hashes)
            self.sim.prefill_done(head, self, now)
        while self.fetching and self.fetching[0][0] <= now + EPS:
            self.ready.append(heapq.heappop(self.fetching)[2])

    def replan(self, now: float) -> None:
        """Choose the next segment's composition and schedule its end."""
        p = self.profile
        self.head = None
        self.chunk = 0.0
        if self.ready:
            job = self.ready[0]
            if job.prefill_start is None:
                fits = self.pinned + job.kv_blocks <= self.capacity or self.n == 0
                if fits and self.n < p.max_num_seqs:
                    job.prefill_start = now
                    self.pinned += job.kv_blocks
            if job.prefill_start is not None:
                self.head = job
                budget = max(p.chunk_tokens - self.n, p.chunk_tokens // 8)
                self.chunk = min(float(budget), job.remaining) if job.remaining > 0 else 1.0
        t_next = None
        if self.n or self.head is not None:
            attn_ctx = 0.0
            if self.head is not None:
                head = self.head
                attn_ctx = head.cached_tokens + (head.uncached - head.remaining) + self.chunk / 2
            self.step = p.step_s(self.chunk, attn_ctx, self.n, self.ctx_base + self.n * self.v)
            if self.n:
                t_next = now + max(0.0, self.decoding[0][0] - self.v) * self.step
            if self.head is not None:
                t_pre = now + self.head.remaining / self.chunk * self.step
                t_next = t_pre if t_next is None else min(t_next, t_pre)
        else:
            self.step = 0.0
        if self.fetching:
            t_fetch = self.fetching[0][0]
            t_next = t_fetch if t_next is None else min(t_next, t_fetch)
        self.version += 1
        if t_next is not None:
            self.sim.schedule_worker(max(t_next, now), self)
        s = self.state
        s.running_requests = self.n
        s.queued_requests = len(self.ready) + len(self.fetching)
        s.free_blocks = max(0, self.capacity - self.pinned)
        s.decode_step_s = self.step if self.n else p.step_overhead_s + p.weights_read_s
        s.queued_prefill_tokens = int(self.queued_tokens)

    def report(self, now: float) -> LoadReportView:
        """The worker's LoadReport at ``now``, with the live field meanings (the emulator's
        GetLoad answers exactly this): running = sequences decoding plus the one prefilling;
        queued = requests waiting to start; queued_prefill_tokens = prompt tokens not computed
        yet, the running prefill's remainder included; decode_step_s = a pure-decode step at
        the current batch (no prefill chunk); prefill_tokens_per_s = the engine's rate."""
        p = self.profile
        queued_tokens = self.queued_tokens
        started = self.head is not None
        if started and self.step > 0:
            queued_tokens -= min(self.head.remaining, self.chunk * (now - self.seg_start) / self.step)
        waiting = len(self.ready) + len(self.fetching) - (1 if started else 0)
        n = self.n
        step = (
            p.step_s(0.0, 0.0, n, self.ctx_base + n * self.v) if n else p.step_overhead_s + p.weights_read_s
        )
        return LoadReportView(
            running_requests=n + (1 if started else 0),
            queued_requests=max(0, waiting),
            queued_prefill_tokens=max(0, int(queued_tokens)),
            free_blocks=max(0, self.capacity - self.pinned),
            total_blocks=self.capacity,
            prefill_tokens_per_s=p.prefill_tokens_per_s,
            decode_step_s=step,
        )

    def refresh(self, now: float) -> None:
        """Cheap load report at ``now`` without ending the segment (what a poll would see)."""
        if self.head is not None and self.step > 0:
            done = min(self.head.remaining, self.chunk * (now - self.seg_start) / self.step)
            self.state.queued_prefill_tokens = max(0, int(self.queued_tokens - done))

"""The discrete-event loop: trace arrivals -> the real policy -> modeled workers -> metrics.

The policy object is built by ``tusk.router.policies.make_policy`` -- the same code the live
router runs -- and sees the same things it sees live: ``WorkerState`` load reports polled every
``poll_interval_s`` (0.5 s, as the live router) through the same ``WorkerLoad`` account that
the live router keeps from its own decisions (``tusk.router.load_account``), a ``PrefixIndex`` fed by KV events that the modeled workers emit as their
LRU caches store and evict blocks (or, with events off, by ``record_route``), and
``RequestOutcome`` feedback when a request finishes.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tusk.router.admission import AdmissionQueue
from tusk.router.load_account import WorkerLoad, open_ticket
from tusk.router.policies import NoWorkerAvailable, make_policy
from tusk.router.policies.base import RequestOutcome, RoutingRequest, WorkerState
from tusk.router.prefix_index import PrefixIndex
from tusk.router.sim.metrics import ideal_hit_rates, percentile, summarize_outcomes, weighted_percentile
from tusk.router.sim.profile import WorkerProfile
from tusk.router.sim.trace import TraceRequest
from tusk.router.sim.worker import Job, SimWorker

from tusk.config import AdmissionConfig, Role

_ARRIVAL, _WORKER, _HANDOFF, _POLL, _ADMIT = 0, 1, 2, 3, 4


@dataclass
class SimConfig:
    policy: str = "cost"
    workers: int = 8  # role=both workers (aggregated) when prefill_workers == 0
    prefill_workers: int = 0
    decode_workers: int = 0
    load_scale: float = 1.0
    seed: int = 0
    block_size: int = 64
    tier_blocks: int = 0  # shared tier capacity in blocks; 0 = no tier
    kv_events: bool = True
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.1
    policy_settings: dict[str, Any] | None = None
    # how often the router sees load reports (simulated seconds); 0 = exact at every arrival
    poll_interval_s: float = 0.5
    # the router's admission queue (tusk.router.admission): its settings; None = off
    admission: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.prefill_workers or self.decode_workers:
            if self.prefill_workers < 0 or self.decode_workers < 1:
                raise ValueError(
                    "a disaggregated cluster needs --decode-workers >= 1 and --prefill-workers >= 0"
                )
            total = self.prefill_workers + self.decode_workers
        else:
            total = self.workers
        if not 1 <= total <= 256:
            raise ValueError(f"the simulator handles 1..256 workers, got {total}")
        if not self.load_scale > 0:
            raise ValueError("load scale must be > 0")
        if self.poll_interval_s < 0:
            raise ValueError("poll interval must be >= 0")
        if self.block_size < 1 or self.tier_blocks < 0:
            raise ValueError("block size must be >= 1 and tier blocks >= 0")


class Simulator:
    def __init__(self, trace: list[TraceRequest], config: SimConfig, profile: WorkerProfile | None = None):
        config.validate()
        self.config = config
        self.profile = profile or WorkerProfile()
        self.trace = trace
        bs = config.block_size
        roles: list[Role]
        if config.prefill_workers or config.decode_workers:
            roles = [Role.PREFILL] * config.prefill_workers + [Role.DECODE] * config.decode_workers
        else:
            roles = [Role.BOTH] * config.workers
        cap = self.profile.capacity_blocks(bs)
        self.max_model_len = self.profile.max_model_len(bs)
        self.index = PrefixIndex(
            max_blocks_per_worker=cap if not config.kv_events else 2 * cap,
            max_tier_blocks=max(1, config.tier_blocks),
        )
        settings = {
            "seed": config.seed,
            "default_prefill_tokens_per_s": self.profile.prefill_tokens_per_s,
            "chunk_tokens": self.profile.chunk_tokens,
            "tier_fetch_s_per_block": self.profile.tier_fetch_s_per_block(bs),
            **(config.policy_settings or {}),
        }
        self.policy = make_policy(config.policy, self.index, **settings)
        self.workers = [SimWorker(i, r, self.profile, bs, self) for i, r in enumerate(roles)]
        # the router's view of each worker (what the policy sees), separate from the worker's truth
        self.states = [
            WorkerState(worker_id=w.worker_id, address=w.state.address, role=w.state.role)
            for w in self.workers
        ]
        self.loads = {s.worker_id: WorkerLoad(s) for s in self.states}
        self.now = 0.0
        self.index.clock = lambda: self.now
        self.tier: OrderedDict[int, None] = OrderedDict()
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self.jobs: list[Job] = []
        self._itl: list[tuple[float, float]] = []
        self.decision_s: list[float] = []
        self.rejected = 0
        self.disaggregated = 0
        self._admit_pending = False
        self.admission = (
            AdmissionQueue.from_config(
                AdmissionConfig(**config.admission),
                default_prefill_tokens_per_s=self.profile.prefill_tokens_per_s,
                clock=lambda: self.now,
            )
            if config.admission
            else None
        )
        if self.admission is not None:
            # the live router's wiring: the load account tells the queue when load goes down
            for load in self.loads.values():
                load.on_change = self._wake_admission

    # ------------------------------------------------------------------ plumbing for workers
    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def schedule_worker(self, t: float, worker: SimWorker) -> None:
        self._push(t, _WORKER, worker.index, worker.version)

    def itl_sample(self, step_s: float, tokens: float) -> None:
        self._itl.append((step_s, tokens))

    def kv_events(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        if not self.config.kv_events:
            return
        if stored:
            self.index.apply_event(worker_id, "stored", "device", stored)
        if removed:
            self.index.apply_event(worker_id, "removed", "device", removed)

    def _tier_store(self, hashes: list[int]) -> None:
        if not self.config.tier_blocks:
            return
        tier = self.tier
        stored, removed = [], []
        for h in hashes:
            if h in tier:
                tier.move_to_end(h)
            else:
                tier[h] = None
                stored.append(h)
        while len(tier) > self.config.tier_blocks:
            removed.append(tier.popitem(last=False)[0])
        if self.config.kv_events:
            if stored:
                self.index.apply_event("tier", "stored", "tier", stored)
            if removed:
                self.index.apply_event("tier", "removed", "tier", removed)

    def _tier_lookup(self, hashes: list[int], start: int) -> int:
        n = 0
        for h in hashes[start:]:
            if h not in self.tier:
                break
            self.tier.move_to_end(h)
            n += 1
        return n

    # ------------------------------------------------------------------ request life
    def _poll(self, now: float) -> None:
        """Every worker's LoadReport reaches the router's account (GetLoad, live)."""
        for w, state in zip(self.workers, self.states, strict=True):
            self.loads[state.worker_id].apply_report(w.report(now))

    def _arrive(self, job: Job, now: float) -> None:
        if job.req.input_tokens + job.req.output_tokens > self.max_model_len:
            self.rejected += 1  # refused up front, as the emulator and real engines do
            return
        if not self.config.poll_interval_s:
            self._poll(now)
        queue = self.admission
        if queue is not None:
            req = job.req

            def work() -> float:
                return queue.work_s(self.index, req.block_hashes, req.input_tokens, self.config.block_size)

            if queue.offer(job, work, self.states) is not None:
                return  # held at the router; ``_admit_waiting`` routes it when a worker has room
        self._route(job, now)

    def _wake_admission(self) -> None:
        """Load went down (``WorkerLoad.on_change``): let held requests in once the current
        event is done, not from inside a worker's own ``advance``."""
        if self.admission is not None and len(self.admission) and not self._admit_pending:
            self._admit_pending = True
            self._push(self.now, _ADMIT, 0)

    def _admit_waiting(self, now: float) -> None:
        """Route held requests while a worker has room (after every change of load)."""
        queue = self.admission
        if queue is None or not len(queue):
            return
        while (job := queue.pop_next(self.states)) is not None:
            self._route(job, now)

    def _route(self, job: Job, now: float) -> None:
        req = job.req
        rr = RoutingRequest(
            request_id=str(job.idx),
            block_hashes=req.block_hashes,
            prompt_tokens=req.input_tokens,
            block_size=self.config.block_size,
            session_key=req.session_key,
            max_tokens=req.output_tokens,
        )
        t0 = time.perf_counter()
        try:
            decision = self.policy.route(rr, self.states)
        except NoWorkerAvailable:
            self.rejected += 1
            return
        self.decision_s.append(time.perf_counter() - t0)
        job.decision = decision
        dw = self._worker_of(decision.decode)
        pw = self._worker_of(decision.prefill) if decision.prefill is not None else dw
        if decision.prefill is not None:
            self.disaggregated += 1
            decision.prefill.inflight += 1
        decision.decode.inflight += 1
        job.ticket = open_ticket(
            self.loads, decision, req.input_tokens, req.output_tokens, self.config.block_size
        )
        if not self.config.kv_events:
            self.index.record_route(pw.worker_id, req.block_hashes)
            if dw is not pw:
                self.index.record_route(dw.worker_id, req.block_hashes)
        bs = self.config.block_size
        local = pw.lookup(req.block_hashes)
        fetched = self._tier_lookup(req.block_hashes, local) if self.config.tier_blocks else 0
        job.cached_blocks = local + fetched
        job.cached_tokens = min(req.input_tokens - 1, job.cached_blocks * bs)
        job.uncached = req.input_tokens - job.cached_tokens
        job.remaining = float(job.uncached)
        job.kv_blocks = math.ceil((req.input_tokens + req.output_tokens) / bs)
        pw.enqueue_prefill(job, now, fetched * self.profile.tier_fetch_s_per_block(bs))

    def _worker_of(self, state: Any) -> SimWorker:
        return self.workers[self._by_id[state.worker_id]]

    def prefill_done(self, job: Job, worker: SimWorker, now: float) -> None:
        """Called by ``worker`` (inside its own advance) when a prefill finishes: first token."""
        self._tier_store(job.req.block_hashes)
        assert job.decision is not None
        job.ticket.first_token()
        if job.decision.prefill is None:
            worker.admit_decode(job, now)
            return
        job.decision.prefill.inflight -= 1
        worker.pinned -= job.kv_blocks
        if job.req.output_tokens <= 1:
            self.finish(job, self._worker_of(job.decision.decode), now)
            return
        job.handoff_s = self.profile.handoff_s(len(job.req.block_hashes), self.config.block_size)
        self._push(now + job.handoff_s, _HANDOFF, job.idx)

    def finish(self, job: Job, worker: SimWorker, now: float) -> None:
        job.finish = now
        job.completions += 1
        job.ticket.done()
        assert job.decision is not None
        job.decision.decode.inflight -= 1
        assert job.decision is not None and job.prefill_start is not None and job.prefill_end is not None
        decode_tokens = job.req.output_tokens - 1
        decode_s = now - job.decode_start if job.decode_start is not None and decode_tokens > 0 else None
        outcome = RequestOutcome(
            decision=job.decision,
            prompt_tokens=job.req.input_tokens,
            cached_tokens=job.cached_tokens,
            prefill_s=job.prefill_end - job.prefill_start,
            ttft_s=job.prefill_end - job.req.arrival_s,
            decode_tokens=decode_tokens,
            decode_s=decode_s,
            handoff_s=job.handoff_s,
        )
        job.outcome = outcome
        self.policy.observe(outcome)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        wall0 = time.perf_counter()
        self._by_id = {w.worker_id: i for i, w in enumerate(self.workers)}
        scale = self.config.load_scale
        for i, req in enumerate(self.trace):
            job = Job(
                idx=i,
                req=TraceRequest(
                    req.arrival_s / scale,
                    req.input_tokens,
                    req.output_tokens,
                    req.block_hashes,
                    req.session_key,
                ),
            )
            self.jobs.append(job)
            self._push(job.req.arrival_s, _ARRIVAL, i)
        poll = self.config.poll_interval_s
        if poll:
            self._poll(0.0)
            self._push(poll, _POLL, 0)
        events = self._events
        workers = self.workers
        while events:
            now, _, kind, a, b = heapq.heappop(events)
            self.now = now
            if kind == _POLL:
                self._poll(now)
                if len(events) > 0:  # other events pending: keep polling
                    self._push(now + poll, _POLL, 0)
            elif kind == _ARRIVAL:
                self._arrive(self.jobs[a], now)
            elif kind == _ADMIT:
                self._admit_pending = False
                self._admit_waiting(now)
            elif kind == _WORKER:
                w = workers[a]
                if b == w.version:
                    w.advance(now)
                    w.replan(now)
            else:
                job = self.jobs[a]
                assert job.decision is not None
                job.ticket.decode_started()
                self._worker_of(job.decision.decode).receive_handoff(job, now)
        return self._metrics(time.perf_counter() - wall0)

    def _metrics(self, wall_s: float) -> dict[str, Any]:
        cfg = self.config
        done = [j for j in self.jobs if j.finish is not None]
        ttft = [j.prefill_end - j.req.arrival_s for j in done if j.prefill_end is not None]
        total_blocks = sum(len(j.req.block_hashes) for j in self.jobs)
        hit_blocks = sum(j.cached_blocks for j in self.jobs if j.decision is not None)
        capacity = sum(w.capacity for w in self.workers) + cfg.tier_blocks
        ideal, capacity_ideal = ideal_hit_rates([j.req.block_hashes for j in self.jobs], capacity)
        out_tokens = sum(j.req.output_tokens for j in done)
        t_first = min((j.req.arrival_s for j in self.jobs), default=0.0)
        t_last = max((j.finish for j in done), default=t_first)
        span = max(t_last - t_first, 1e-9)

        def request_itl(j: Job) -> float:
            n = j.req.output_tokens - 1
            return (j.finish - j.decode_start) / n if n > 0 and j.decode_start is not None else 0.0

        slo_ok = sum(
            1
            for j in done
            if j.prefill_end - j.req.arrival_s <= cfg.ttft_slo_s and request_itl(j) <= cfg.itl_slo_s
        )
        busy = [w.busy_s for w in self.workers]
        mean_busy = sum(busy) / len(busy)
        dec = sorted(self.decision_s)
        threshold = getattr(self.policy, "threshold_tokens", None)
        outcomes = [
            j.outcome
            if j.outcome is not None
            else RequestOutcome(None, j.req.input_tokens, 0, None, None, ok=False, error="not completed")
            for j in self.jobs
        ]
        summary = summarize_outcomes(outcomes, cfg.ttft_slo_s, cfg.itl_slo_s)
        return {
            "policy": cfg.policy,
            "poll_interval_s": cfg.poll_interval_s,
            "workers": len(self.workers),
            "prefill_workers": cfg.prefill_workers,
            "decode_workers": cfg.decode_workers,
            "load_scale": cfg.load_scale,
            "seed": cfg.seed,
            "requests": len(self.jobs),
            "completed": len(done),
            "rejected": self.rejected,
            "prefix_hit_rate": hit_blocks / total_blocks if total_blocks else 0.0,
            "hit_rate": summary["hit_rate"],  # cached / prompt tokens, as live engines report it
            "tpot_p50_s": summary["tpot_p50_s"],
            "tpot_p90_s": summary["tpot_p90_s"],
            "ideal_hit_rate": ideal,
            "capacity_ideal_hit_rate": capacity_ideal,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": weighted_percentile(self._itl, 50),
            "itl_p99_s": weighted_percentile(self._itl, 99),
            "throughput_tok_s": out_tokens / span,
            "slo_attainment": slo_ok / len(self.jobs) if self.jobs else 0.0,
            "ttft_slo_s": cfg.ttft_slo_s,
            "itl_slo_s": cfg.itl_slo_s,
            "load_spread": max(busy) / mean_busy if mean_busy > 0 else 1.0,
            "disaggregated_fraction": self.disaggregated / len(self.jobs) if self.jobs else 0.0,
            "threshold_tokens": threshold,
            "decision_us_p50": percentile(dec, 50) * 1e6,
            "decision_us_p99": percentile(dec, 99) * 1e6,
            "sim_span_s": span,
            "wall_s": wall_s,
        }

"""The simulator's worker model, driven by the wall clock: the timing core of ``tusk emulate``.

``SimWorker`` (``worker.py``) is a discrete-event model of one engine: a prefill FIFO and a
decode batch sharing steps (continuous batching, chunked prefill), an LRU KV cache that emits
KV events, step times from a ``WorkerProfile``. The simulator advances it from its event heap;
``EmulatedEngine`` advances the very same object from asyncio timers, so an emulated worker
and a simulated one take the same time for the same work by construction.

Time: ``emulated seconds = wall seconds x time_scale`` (``time_scale`` < 1 slows the engine
down, so host noise becomes small next to the modeled times; the load generator divides the
trace's arrival times by the same factor).

Tokens stream out in batches: every ``stream_interval_s`` of wall time each decoding request
gets the tokens its decode steps produced since the last flush (the model is fluid between
batch changes, see ``worker.py``). A cancelled request stops streaming at once but its modeled
work runs to completion (the model cannot remove a running request).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tusk.router.sim.profile import WorkerProfile
from tusk.router.sim.trace import TraceRequest
from tusk.router.sim.worker import Job, SimWorker

from tusk.config import Role
from tusk.hashing import block_hashes

KvListener = Callable[[list[int], list[int]], None]  # (stored, removed)


@dataclass(eq=False)
class LiveRequest:
    """What a caller awaits: ``events`` yields ("first", None), ("tokens", n) and ("done", None)."""

    request_id: str
    mode: str  # "generate", "prefill" or "decode" (after a remote prefill)
    prompt_tokens: int
    max_tokens: int
    hashes: list[int]
    job: Job
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0  # output tokens handed out, first token included
    decoding: bool = False
    cancelled: bool = False
    finished: bool = False
    # timestamps in emulated seconds, for the P/D model: queue wait, prefill compute, handoff
    arrived_s: float = 0.0

    @property
    def cached_tokens(self) -> int:
        return self.job.cached_tokens

    def timings(self, time_scale: float) -> tuple[float, float, float]:
        """(queue, prefill, handoff) in wall seconds, as a worker reports them."""
        j = self.job
        queue = prefill = handoff = 0.0
        if self.mode == "decode":
            handoff = j.handoff_s or 0.0
        elif j.prefill_start is not None and j.prefill_end is not None:
            queue = max(0.0, j.prefill_start - self.arrived_s)
            prefill = max(0.0, j.prefill_end - j.prefill_start)
        return queue / time_scale, prefill / time_scale, handoff / time_scale


class EmulatedEngine:
    """One emulated worker (the ``sim`` object its ``SimWorker`` reports to)."""

    def __init__(
        self,
        worker_id: str,
        role: Role,
        profile: WorkerProfile,
        block_size: int,
        *,
        time_scale: float = 1.0,
        stream_interval_s: float = 0.05,
        index: int = 0,
    ) -> None:
        if not time_scale > 0:
            raise ValueError("time_scale must be > 0")
        if not stream_interval_s > 0:
            raise ValueError("stream_interval_s must be > 0")
        profile.validate()
        self.worker_id = worker_id
        self.role = role
        self.profile = profile
        self.block_size = block_size
        self.time_scale = time_scale
        self.stream_interval_s = stream_interval_s
        self.core = SimWorker(index, role, profile, block_size, self)  # type: ignore[arg-type]
        self.core.worker_id = worker_id
        self.core.state.worker_id = worker_id
        self.listeners: list[KvListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.TimerHandle | None = None
        self._live: dict[int, LiveRequest] = {}
        self._decoding: set[LiveRequest] = set()
        self._next_idx = 0
        self.cache_hit_tokens = 0
        self.cache_query_tokens = 0

    # ------------------------------------------------------------------ clock
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def now(self) -> float:
        assert self._loop is not None, "start() the engine first"
        return (self._loop.time() - self._t0) * self.time_scale

    def _wall(self, t: float) -> float:
        return self._t0 + t / self.time_scale

    # ------------------------------------------------------------------ the SimWorker's sim interface
    def schedule_worker(self, t: float, worker: SimWorker) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._wall(t), self._tick, worker.version)

    def _tick(self, version: int) -> None:
        self._timer = None
        if version != self.core.version:
            return
        now = self.now()
        self.core.advance(now)
        self.core.replan(now)

    def kv_events(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        for listener in list(self.listeners):
            listener(stored, removed)

    def itl_sample(self, step_s: float, tokens: float) -> None:
        return None

    def prefill_done(self, job: Job, worker: SimWorker, now: float) -> None:
        live = self._live[job.idx]
        self._emit(live, "first", None)
        live.sent = 1
        if live.mode == "prefill":
            worker.pinned -= job.kv_blocks  # the KV leaves with the handoff
            self._end(live)
            return
        worker.admit_decode(job, now)  # may finish it at once (max_tokens 1)
        if not live.finished:
            live.decoding = True
            self._decoding.add(live)
            self._arm_flusher()

    def finish(self, job: Job, worker: SimWorker, now: float) -> None:
        live = self._live.get(job.idx)
        if live is None:
            return
        self._decoding.discard(live)
        rest = live.max_tokens - live.sent
        if rest > 0:
            self._emit(live, "tokens", rest)
            live.sent = live.max_tokens
        self._end(live)

    # ------------------------------------------------------------------ requests
    def _emit(self, live: LiveRequest, kind: str, value: int | None) -> None:
        if not live.cancelled:
            live.events.put_nowait((kind, value))

    def _end(self, live: LiveRequest) -> None:
        live.finished = True
        self._live.pop(live.job.idx, None)
        self._emit(live, "done", None)

    def _job(self, prompt_tokens: int, max_tokens: int, hashes: list[int]) -> Job:
        self._next_idx += 1
        req = TraceRequest(self.now(), prompt_tokens, max(1, max_tokens), hashes)
        return Job(idx=self._next_idx, req=req)

    def submit(
        self, request_id: str, token_ids: list[int], max_tokens: int, mode: str = "generate"
    ) -> LiveRequest:
        """Queue a prompt for prefill here (``generate``: then decode here; ``prefill``: only
        the first token). Returns at once; read ``events``."""
        if mode not in ("generate", "prefill"):
            raise ValueError(f"unknown mode {mode!r}")
        if not token_ids:
            raise ValueError("the prompt is empty")
        now = self.now()
        core = self.core
        bs = self.block_size
        hashes = block_hashes(token_ids, bs)
        n = len(token_ids)
        job = self._job(n, max_tokens, hashes)
        local = core.lookup(hashes)
        job.cached_blocks = local
        job.cached_tokens = min(n - 1, local * bs)
        job.uncached = n - job.cached_tokens
        job.remaining = float(job.uncached)
        job.kv_blocks = math.ceil((n + max(1, max_tokens)) / bs)
        self.cache_hit_tokens += job.cached_tokens
        self.cache_query_tokens += n
        live = LiveRequest(request_id, mode, n, max(1, max_tokens), hashes, job, arrived_s=now)
        self._live[job.idx] = live
        core.enqueue_prefill(job, now, 0.0)
        return live

    def submit_decode(self, request_id: str, token_ids: list[int], max_tokens: int) -> LiveRequest:
        """Decode after a remote prefill: the prompt's KV arrives after the profile's handoff
        time (latency + bytes / bandwidth), then the request joins the decode batch. The first
        token was already sent by the prefill worker, so this streams the rest."""
        assert self._loop is not None
        hashes = block_hashes(token_ids, self.block_size)
        n = len(token_ids)
        job = self._job(n, max_tokens, hashes)
        job.kv_blocks = math.ceil((n + max(1, max_tokens)) / self.block_size)
        job.cached_tokens = n
        live = LiveRequest(request_id, "decode", n, max(1, max_tokens), hashes, job, arrived_s=self.now())
        live.sent = 1
        self._live[job.idx] = live
        job.handoff_s = self.profile.handoff_s(len(hashes), self.block_size)
        job.prefill_start = job.prefill_end = live.arrived_s

        def arrive() -> None:
            now = self.now()
            if live.max_tokens <= 1:
                self._end(live)
                return
            self._emit(live, "admitted", None)  # the KV is here: the worker reports the handoff
            live.decoding = True
            self._decoding.add(live)
            self.core.receive_handoff(job, now)
            self._arm_flusher()

        self._loop.call_later(job.handoff_s / self.time_scale, arrive)
        return live

    def cancel(self, live: LiveRequest) -> None:
        """Stop streaming ``live`` (its modeled work still runs out; see the module doc)."""
        live.cancelled = True
        self._decoding.discard(live)

    # ------------------------------------------------------------------ streaming
    def _arm_flusher(self) -> None:
        if self._flusher is None and self._decoding and self._loop is not None:
            self._flusher = self._loop.call_later(self.stream_interval_s, self._flush)

    def _flush(self) -> None:
        self._flusher = None
        core = self.core
        v = core.v
        if core.n and core.step > 0:
            v += (self.now() - core.seg_start) / core.step
        for live in list(self._decoding):
            job = live.job
            if job.decode_start is None:
                continue
            produced = 1 + int(v - job.v_admit + 1e-9)
            new = min(live.max_tokens - 1, produced) - live.sent
            if new > 0:
                self._emit(live, "tokens", new)
                live.sent += new
        self._arm_flusher()

    # ------------------------------------------------------------------ reports
    def load_report(self):
        """The LoadReport fields, as the simulator's router polls them (``SimWorker.report``)."""
        return self.core.report(self.now())

    def cached_hashes(self) -> list[int]:
        return list(self.core.cache)

"""Router-side admission: one queue per model that holds requests while every worker already
has a prefill backlog, and lets the cheapest one go first when a worker is about to run dry.

Why: an engine prefills first come, first served. When every worker is busy, a 500-token
prompt that lands behind a 60k-token prefill waits for all of it, whichever worker the policy
picks; routing alone cannot help it. Holding requests at the router while no worker could start
them soon does two things routing cannot:

* **late binding**: the request is routed when a worker is about to need work, with the load
  and cache view of that moment rather than of its arrival;
* **order**: of the requests waiting, the one with the least prefill work left (prompt tokens
  after the best cache credit any worker or the tier offers, divided by the prefill rate) goes
  first, so short and cached prompts are not stuck behind long cold ones. Every second a
  request waits lowers its rank by ``aging`` seconds of work, so a long prompt is overtaken by
  newcomers for at most ``its work / aging`` seconds (no starvation).

This is what engines do inside one worker (vLLM's ``--scheduling-policy priority``, SGLang's
longest-prefix-match queue); doing it in the router applies it across the whole pool, before
the request is tied to a worker. The price is paid by the longest cold prompts, which wait
longer than first come, first served would make them: ``bench/routing_live.py`` reports p99
beside p50/p90 for that reason.

"About to run dry" means a worker that can prefill has less than ``backlog_s`` seconds of
prefill work outstanding (``queued_prefill_tokens / prefill_tokens_per_s``, from the router's
own load account, so it moves at every first token, not only at load polls). The queue is
bounded (``max_waiting``); past it a request is refused at once (the router answers 429) rather
than piling up. ``backlog_s = 0`` turns admission off: every request is routed on arrival.

The queue holds opaque items; the live router (``tusk.router.dispatch``) waits on a future per
item, the simulator (``tusk.router.sim``) holds its jobs: both call the same ``offer`` and
``pop_next`` with the same worker view, so the simulator models the router as it runs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from tusk.router.policies.base import DEFAULT_PREFILL_TOKENS_PER_S, WorkerState
from tusk.router.prefix_index import PrefixIndex

from tusk.config import AdmissionConfig


class QueueFull(RuntimeError):
    """The model's admission queue holds ``max_waiting`` requests already (HTTP 429)."""


class AdmissionQueue:
    """The queue itself; settings and their defaults are ``tusk.config.AdmissionConfig``."""

    def __init__(
        self,
        backlog_s: float,
        aging: float,
        max_waiting: int,
        default_prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backlog_s < 0:
            raise ValueError("admission backlog_s must be >= 0")
        if aging <= 0:
            raise ValueError("admission aging must be > 0")
        if max_waiting < 1:
            raise ValueError("admission max_waiting must be >= 1")
        if default_prefill_tokens_per_s <= 0:
            raise ValueError("default_prefill_tokens_per_s must be > 0")
        self.backlog_s = backlog_s
        self.aging = aging
        self.max_waiting = max_waiting
        self.default_rate = default_prefill_tokens_per_s
        self.clock = clock
        # rank = work_s + aging * arrival: ``work - aging * waited`` ordered the same at any
        # instant, so a heap keeps the order without re-scoring as time passes
        self._heap: list[tuple[float, int, Any]] = []
        self._live: set[int] = set()  # tickets in the heap not withdrawn
        self._seq = itertools.count()
        self.admitted_at_once = 0
        self.held = 0

    @property
    def enabled(self) -> bool:
        return self.backlog_s > 0

    def __len__(self) -> int:
        return len(self._live)

    @classmethod
    def from_config(cls, config: AdmissionConfig, **kwargs: Any) -> AdmissionQueue:
        return cls(config.backlog_s, config.aging, config.max_waiting, **kwargs)

    def configure(self, config: AdmissionConfig) -> None:
        """New settings, live; requests already waiting keep their place."""
        self.backlog_s, self.aging, self.max_waiting = config.backlog_s, config.aging, config.max_waiting

    # ----------------------------------------------------------------- the room test
    def has_room(self, workers: Iterable[WorkerState]) -> bool:
        """Some healthy worker has less than ``backlog_s`` of prefill queued, or there is no
        healthy worker at all (nothing to wait for: routing answers 503). Decode-role workers
        count: a decode-capable worker can always prefill for itself (``policies.pools``), and
        in a P/D cluster the ``cost`` policy keeps requests there when the prefill pool is
        busy; gating on the prefill pool alone held every request behind it."""
        limit = self.backlog_s
        any_worker = False
        for w in workers:
            if w.healthy:
                any_worker = True
                rate = w.prefill_tokens_per_s or self.default_rate
                if w.queued_prefill_tokens < limit * rate:
                    return True
        return not any_worker

    def work_s(self, index: PrefixIndex, hashes: list[int], prompt_tokens: int, block_size: int) -> float:
        """The request's prefill work after the best cache credit anywhere, in seconds of a
        worker at the default rate (only the order matters)."""
        cached = 0
        if hashes:
            matches = index.match(hashes)
            cached = max(max(matches.values(), default=0), index.tier_match(hashes)) * block_size
        return max(0, prompt_tokens - cached) / self.default_rate

    # ----------------------------------------------------------------- queue
    def offer(
        self, item: Any, work_s: float | Callable[[], float], workers: Iterable[WorkerState]
    ) -> int | None:
        """Admit ``item`` now (returns None: route it) or queue it (returns its ticket for
        ``withdraw``). Nothing jumps a non-empty queue: a newcomer is ranked with the rest.
        ``work_s`` may be a function: it is called only when the request has to wait, so a
        request routed at once pays no extra index lookup."""
        if not self.enabled or (not len(self) and self.has_room(workers)):
            self.admitted_at_once += 1
            return None
        if len(self) >= self.max_waiting:
            raise QueueFull(f"{len(self)} requests are waiting for a worker")
        if callable(work_s):
            work_s = work_s()
        ticket = next(self._seq)
        heapq.heappush(self._heap, (work_s + self.aging * self.clock(), ticket, item))
        self._live.add(ticket)
        self.held += 1
        return ticket

    def withdraw(self, ticket: int) -> None:
        """A queued request left (client gone, deadline passed): it will never be popped.
        Withdrawing a ticket already popped or withdrawn does nothing."""
        self._live.discard(ticket)
        self._drop_gone()

    def pop_next(self, workers: Iterable[WorkerState]) -> Any | None:
        """The next item to route if a worker has room, else None. Route it (which charges the
        load account) before asking again."""
        self._drop_gone()
        if not self._heap or not self.has_room(workers):
            return None
        _, ticket, item = heapq.heappop(self._heap)
        self._live.discard(ticket)
        return item

    def _drop_gone(self) -> None:
        heap, live = self._heap, self._live
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)


class AdmissionGate:
    """The queue for the live router: a request waits in ``enter`` and is routed when released.

    Releasing *is* routing: ``pump`` calls each released request's ``route`` itself, at once,
    because routing is what charges the load account and so what takes a worker's room away;
    the next request is then judged against the charged account, exactly as the simulator does
    (it routes synchronously too). Waking a task and letting it route later would release
    requests faster than the account learns of them, or, released one at a time, would add an
    event-loop turn per request. The gate is pumped whenever load goes down
    (``WorkerLoad.on_change``: a first token, a finished request, a load report)."""

    def __init__(self, queue: AdmissionQueue, workers: Callable[[], list[WorkerState]]) -> None:
        self.queue = queue
        self.workers = workers
        self._pumping = False

    async def enter(
        self, work_s: float | Callable[[], float], timeout_s: float, route: Callable[[], Any]
    ) -> Any | None:
        """None when there is room now: the caller routes. Otherwise waits, and returns what
        ``route()`` returned when the request was released (or raises what it raised). Raises
        ``QueueFull``, or ``TimeoutError`` after ``timeout_s``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ticket = self.queue.offer((future, route), work_s, self.workers())
        if ticket is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except BaseException:
            if not future.done():
                future.cancel()
                self.queue.withdraw(ticket)
            # else it was routed as it left: its caller releases the charge as for any request
            raise

    def pump(self) -> None:
        """Route waiting requests, least work first, while a worker has room."""
        if self._pumping or not len(self.queue):
            return
        self._pumping = True  # routing may report load changes: no nested pumps
        try:
            while (item := self.queue.pop_next(self.workers())) is not None:
                future, route = item
                if future.done():
                    continue
                try:
                    future.set_result(route())
                except Exception as exc:  # the request's own error (no worker...), for its waiter
                    future.set_exception(exc)
        finally:
            self._pumping = False

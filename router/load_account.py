"""Router-side load prediction: what each worker is doing, from the router's own decisions.

A worker's ``LoadReport`` is up to one poll interval (0.5 s) old, and a worker deep in a long
prefill has already moved that prompt out of its queue. The router, however, knows every
request it sent: which worker prefills how many uncached tokens, which worker decodes, how many
KV blocks each request holds. ``WorkerLoad`` keeps that account per worker (as Dynamo's
active-sequence tracking and llm-d's in-flight token load do) and corrects it with the worker's
reports: whatever a report shows beyond this router's own account is load from elsewhere (other
router replicas, requests the router lost track of) and is carried until the next report.

What policies see (``WorkerState``), after every routing event and every report::

    queued_prefill_tokens = external_prefill + own uncached prompt tokens not yet prefilled
    running_requests      = external_running + own requests decoding
    free_blocks           = total - external_used - own blocks held   (floored at 0)
    kv_overcommit_blocks  = what that floor cut off: blocks of requests that must wait for
                            running ones to finish before they can start

The simulator (``tusk.router.sim``) drives the very same objects with the same poll interval,
so the information the policies get there is what they get live.

A ``LoadTicket`` is what one request charged; releasing it twice is harmless, so an error path
can always call ``done()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tusk.router.policies.base import RoutingDecision, WorkerState


@dataclass
class LoadReportView:
    """The fields of a worker's LoadReport the account uses (protobuf or simulator)."""

    running_requests: int
    queued_requests: int
    queued_prefill_tokens: int
    free_blocks: int
    total_blocks: int
    prefill_tokens_per_s: float
    decode_step_s: float


class WorkerLoad:
    """One worker's account; writes the predicted load into its ``WorkerState``."""

    __slots__ = (
        "state",
        "own_prefill_tokens",
        "own_prefills",
        "own_decoding",
        "own_blocks",
        "ext_prefill_tokens",
        "ext_running",
        "ext_used_blocks",
        "reported",
        "on_change",
    )

    def __init__(self, state: WorkerState, on_change: Callable[[], None] | None = None) -> None:
        self.state = state
        # called when load may have gone down: a report, a prefill or a decode finished (the
        # live router's admission gate listens; charges only add load, so they do not call it)
        self.on_change = on_change
        self.own_prefill_tokens = 0
        self.own_prefills = 0
        self.own_decoding = 0
        self.own_blocks = 0
        self.ext_prefill_tokens = 0
        self.ext_running = 0
        self.ext_used_blocks = 0
        self.reported = False

    def apply_report(self, r: LoadReportView) -> None:
        """A fresh LoadReport: keep rates as reported, learn the load that is not ours."""
        s = self.state
        s.total_blocks = r.total_blocks
        s.queued_requests = r.queued_requests
        s.prefill_tokens_per_s = r.prefill_tokens_per_s
        s.decode_step_s = r.decode_step_s
        self.ext_prefill_tokens = max(0, r.queued_prefill_tokens - self.own_prefill_tokens)
        self.ext_running = max(0, r.running_requests - self.own_decoding - self.own_prefills)
        self.ext_used_blocks = max(0, (r.total_blocks - r.free_blocks) - self.own_blocks)
        self.reported = True
        self._publish()
        self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _publish(self) -> None:
        s = self.state
        s.queued_prefill_tokens = self.ext_prefill_tokens + self.own_prefill_tokens
        s.running_requests = self.ext_running + self.own_decoding
        if s.total_blocks:
            free = s.total_blocks - self.ext_used_blocks - self.own_blocks
            s.free_blocks = max(0, free)
            s.kv_overcommit_blocks = max(0, -free)

    def charge(self, prefill_tokens: int, prefill: bool, blocks: int) -> None:
        self.own_prefill_tokens += prefill_tokens
        self.own_prefills += 1 if prefill else 0
        self.own_blocks += blocks
        self._publish()

    def prefill_finished(self, prefill_tokens: int, blocks_released: int, notify: bool = True) -> None:
        self.own_prefill_tokens = max(0, self.own_prefill_tokens - prefill_tokens)
        self.own_prefills = max(0, self.own_prefills - 1)
        self.own_blocks = max(0, self.own_blocks - blocks_released)
        self._publish()
        if notify:
            self._notify()

    def decode_started(self, blocks: int) -> None:
        self.own_decoding += 1
        self.own_blocks += blocks
        self._publish()

    def decode_finished(self, blocks: int) -> None:
        self.own_decoding = max(0, self.own_decoding - 1)
        self.own_blocks = max(0, self.own_blocks - blocks)
        self._publish()
        self._notify()


class LoadTicket:
    """What one request charged to its workers. Call ``first_token()`` when the prompt is
    prefilled (first token seen), ``decode_started()`` when a split request's decode begins,
    and ``done()`` when it ends for whatever reason; every step is idempotent."""

    __slots__ = ("prefill", "decode", "uncached", "blocks", "_prefilled", "_decoding", "_done")

    def __init__(self, prefill: WorkerLoad, decode: WorkerLoad, uncached: int, blocks: int) -> None:
        self.prefill = prefill
        self.decode = decode
        self.uncached = uncached
        self.blocks = blocks
        self._prefilled = False
        self._decoding = False
        self._done = False
        prefill.charge(uncached, True, blocks)

    @property
    def split(self) -> bool:
        return self.prefill is not self.decode

    def first_token(self) -> None:
        if self._prefilled or self._done:
            return
        self._prefilled = True
        if self.split:
            # the prefill worker frees the request's blocks once the KV is handed off
            self.prefill.prefill_finished(self.uncached, self.blocks)
        else:  # the same worker keeps the blocks to decode: tell listeners once, after both
            self.prefill.prefill_finished(self.uncached, self.blocks, notify=False)
            self.decode_started()
            self.prefill._notify()

    def decode_started(self) -> None:
        if self._decoding or self._done:
            return
        self._decoding = True
        self.decode.decode_started(self.blocks)

    def done(self) -> None:
        if self._done:
            return
        if not self._prefilled:
            self._prefilled = True
            self.prefill.prefill_finished(self.uncached, self.blocks)
        if self._decoding:
            self.decode.decode_finished(self.blocks)
        self._done = True


def open_ticket(
    loads: dict[str, WorkerLoad],
    decision: RoutingDecision,
    prompt_tokens: int,
    max_tokens: int,
    block_size: int,
) -> LoadTicket:
    """Charge a routing decision: the prefilling worker gets the uncached prompt tokens the
    policy expected (``expected_cached_tokens``), both get the request's KV blocks."""
    prefill_state = decision.prefill or decision.decode
    uncached = max(0, prompt_tokens - decision.expected_cached_tokens)
    blocks = math.ceil((prompt_tokens + max(0, max_tokens)) / max(1, block_size))
    return LoadTicket(loads[prefill_state.worker_id], loads[decision.decode.worker_id], uncached, blocks)

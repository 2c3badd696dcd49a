"""Filtering shared by every policy: which healthy workers can take which phase.

A cluster is *disaggregated* when it has healthy prefill-role workers. Decode-capable workers
(role ``decode`` or ``both``) can always prefill for themselves, which is what makes
aggregated fallback (and the cost policy's conditional disaggregation) possible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tusk.router.policies.base import NoWorkerAvailable, RoutingRequest, WorkerState

from tusk.config import Role


@dataclass
class Pools:
    prefill: list[WorkerState]  # dedicated prefill workers (role=prefill), healthy
    decode: list[WorkerState]  # healthy workers that can decode (and so also prefill locally)

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)


def split_pools(workers: Sequence[WorkerState]) -> Pools:
    """Healthy workers by the phase they can run; raises when nobody can decode."""
    prefill = [w for w in workers if w.healthy and w.role == Role.PREFILL]
    decode = [w for w in workers if w.healthy and w.can_decode]
    if not decode:
        raise NoWorkerAvailable("no healthy worker can decode")
    return Pools(prefill=prefill, decode=decode)


def rendezvous(key: bytes, candidates: Sequence[WorkerState]) -> WorkerState:
    """Highest-random-weight hashing: stable under worker churn (only keys of a departed
    worker move) and needs no ring state. BLAKE2b because Python's hash() is salted."""

    def weight(w: WorkerState) -> int:
        digest = hashlib.blake2b(key + b"\0" + w.worker_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    return max(candidates, key=weight)


def least_loaded(candidates: Sequence[WorkerState]) -> WorkerState:
    """Fewest router-counted in-flight requests, then smallest reported queue."""
    return min(candidates, key=lambda w: (w.inflight, w.running_requests + w.queued_requests))


def prefix_key(request: RoutingRequest, depth: int) -> bytes | None:
    if not request.block_hashes:
        return None
    h = request.block_hashes[min(depth, len(request.block_hashes)) - 1]
    return h.to_bytes(8, "little")


Picker = Callable[[RoutingRequest, list[WorkerState], str], WorkerState]

"""Filtering shared by every policy: which healthy workers can take which phase.

A cluster is *disaggregated* when it has healthy prefill-role workers. Decode-capable workers
(role ``decode`` or ``both``) can always prefill for themselves, which is what makes
aggregated fallback (and the cost policy's conditional disaggregation) possible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple

from tusk.router.policies.base import NoWorkerAvailable, RoutingRequest, WorkerState

from tusk.config import Role


class Pools(NamedTuple):
    prefill: list[WorkerState]  # dedicated prefill workers (role=prefill), healthy
    decode: list[WorkerState]  # healthy workers that can decode (and so also prefill locally)

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)


def split_pools(workers: Sequence[WorkerState]) -> Pools:
    """Healthy workers by the phase they can run; raises when nobody can decode."""
    prefill_role = Role.PREFILL
    prefill = [w for w in workers if w.healthy and w.role == prefill_role]
    decode = [w for w in workers if w.healthy and w.role != prefill_role]
    if not decode:
        raise NoWorkerAvailable("no healthy worker can decode")
    return Pools(prefill, decode)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit bijection."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=4096)
def digest64(data: bytes) -> int:
    """Stable 64-bit digest (BLAKE2b: Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def rendezvous_weight(key: int, worker_id: str) -> int:
    """A worker's weight for a 64-bit key; the highest weight is the key's home."""
    return _mix64((key & _MASK64) ^ digest64(worker_id.encode()))


def rendezvous(key: bytes, candidates: Sequence[WorkerState]) -> WorkerState:
    """Highest-random-weight hashing: stable under worker churn (only keys of a departed
    worker move), needs no ring state, and every router replica agrees. Weight =
    mix(digest(key) ^ digest(worker id)); worker digests are cached, so a pick costs one
    BLAKE2b and one integer mix per candidate."""
    k = digest64(key)
    return max(candidates, key=lambda w: _mix64(k ^ digest64(w.worker_id.encode())))


def least_loaded(candidates: Sequence[WorkerState]) -> WorkerState:
    """Fewest router-counted in-flight requests, then smallest reported queue."""
    return min(candidates, key=lambda w: (w.inflight, w.running_requests + w.queued_requests))


def prefix_key(request: RoutingRequest, depth: int) -> bytes | None:
    if not request.block_hashes:
        return None
    h = request.block_hashes[min(depth, len(request.block_hashes)) - 1]
    return h.to_bytes(8, "little")


Picker = Callable[[RoutingRequest, list[WorkerState], str], WorkerState]

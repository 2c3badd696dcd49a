"""Routing policies (filter -> score -> pick) shared by the router and the simulator.

``make_policy(name, index, **settings)`` builds one. Policies never do I/O and keep state only
in themselves and the ``PrefixIndex``; whoever drives them (the live router or ``tusk sim``)
keeps the index up to date: KV events through ``index.apply_event`` or, with events off,
``index.record_route(decision.decode.worker_id, hashes)`` (and the prefill worker's) after
each decision, and calls ``policy.observe(outcome)`` when a request finishes.
"""

from __future__ import annotations

import inspect
from typing import Any

from tusk.router.policies.base import (
    NoWorkerAvailable,
    Policy,
    RequestOutcome,
    RoutingDecision,
    RoutingRequest,
    WorkerState,
)
from tusk.router.policies.cache_aware import CacheAware
from tusk.router.policies.cost import CostPolicy
from tusk.router.policies.simple import LeastRequest, PrefixHash, RandomPolicy, RoundRobin, Session
from tusk.router.prefix_index import PrefixIndex

_CLASSES: dict[str, type] = {
    "round_robin": RoundRobin,
    "random": RandomPolicy,
    "least_request": LeastRequest,
    "session": Session,
    "prefix_hash": PrefixHash,
    "cache_aware": CacheAware,
    "cost": CostPolicy,
}
POLICY_NAMES: tuple[str, ...] = tuple(_CLASSES)


def make_policy(name: str, index: PrefixIndex, **settings: Any) -> Policy:
    """Build policy ``name``. Settings a policy does not take are ignored (so one routing
    config can carry e.g. ``disaggregation_threshold_tokens`` whatever the policy); ``seed``
    seeds ``random``."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in params and k != "self"}
    if "index" in params:
        kwargs["index"] = index
    return cls(**kwargs)


__all__ = [
    "POLICY_NAMES",
    "CacheAware",
    "CostPolicy",
    "LeastRequest",
    "NoWorkerAvailable",
    "Policy",
    "PrefixHash",
    "PrefixIndex",
    "RandomPolicy",
    "RequestOutcome",
    "RoundRobin",
    "RoutingDecision",
    "RoutingRequest",
    "Session",
    "WorkerState",
    "make_policy",
]

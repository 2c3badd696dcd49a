"""Routing policies (filter -> score -> pick) shared by the router and the simulator.

``POLICY_NAMES`` is a plain tuple of names (the CRD's enum is generated from it). Peer
policies are profiles on the scorer pipeline (``profiles.py``, each citing its source).

``make_policy(name, index, **settings)`` builds one. Policies never do I/O and keep state only
in themselves and the ``PrefixIndex``; whoever drives them (the live router or ``tusk sim``)
keeps the index up to date: KV events through ``index.apply_event`` or, with events off,
``index.record_route(decision.decode.worker_id, hashes)`` (and the prefill worker's) after
each decision, and calls ``policy.observe(outcome)`` when a request finishes.
"""

from __future__ import annotations

import inspect
import types
import typing
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
from tusk.router.policies.profiles import DynamoCost, LlmdSticky, LlmdWeighted, SGLangCacheAware
from tusk.router.policies.scorers import SCORER_NAMES, WeightedPolicy
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
    "weighted": WeightedPolicy,
    "sglang_cache_aware": SGLangCacheAware,
    "llmd_sticky": LlmdSticky,
    "llmd_weighted": LlmdWeighted,
    "dynamo_cost": DynamoCost,
}
POLICY_NAMES: tuple[str, ...] = tuple(_CLASSES)


def _params(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in plain and p.name not in ("self", "index")}


# every setting some policy takes, plus ``seed`` (random) -- anything else is a typo
SETTING_NAMES: tuple[str, ...] = tuple(
    sorted(set().union(*(_params(c) for c in _CLASSES.values())) | {"seed"})
)


def setting_types() -> dict[str, Any]:
    """Each setting's Python type (``None`` stripped: unset means the policy's default), so
    config schemas such as the ModelDeployment CRD can be generated from the policies."""
    found: dict[str, set[Any]] = {}
    for cls in _CLASSES.values():
        hints = typing.get_type_hints(cls.__init__)
        for name in _params(cls):
            hint = hints.get(name, Any)
            present = [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) in (types.UnionType, typing.Union) and len(present) == 1:
                hint = present[0]
            found.setdefault(name, set()).add(hint)
    out: dict[str, Any] = {}
    for name in SETTING_NAMES:
        kinds = found.get(name, set())
        if len(kinds) > 1:
            raise TypeError(f"policies disagree on the type of setting {name}: {kinds}")
        out[name] = kinds.pop() if kinds else Any
    return out


def check_settings(settings: dict[str, Any]) -> None:
    """Raise ValueError for a setting no policy takes, listing the valid names."""
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(
            f"unknown routing setting(s) {', '.join(unknown)}; valid settings: {', '.join(SETTING_NAMES)}"
        )


def make_policy(name: str, index: PrefixIndex, **settings: Any) -> Policy:
    """Build policy ``name``. A setting no policy takes is an error; settings only other
    policies take are ignored (so one routing config can carry e.g.
    ``disaggregation_threshold_tokens`` whatever the policy); ``seed`` seeds ``random``."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    check_settings(settings)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in params and k != "self"}
    if "index" in params:
        kwargs["index"] = index
    return cls(**kwargs)


__all__ = [
    "POLICY_NAMES",
    "SCORER_NAMES",
    "SETTING_NAMES",
    "check_settings",
    "setting_types",
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

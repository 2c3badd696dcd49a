"""Checks for specs that pass the schema but cannot work in this cluster.

A missing Secret or an accelerator no node offers would otherwise show up as pods stuck in
``CreateContainerConfigError`` or ``Pending`` with nothing on the ModelDeployment itself. Each
problem becomes a Degraded reason with a message that says what to fix; the operator then leaves
the running children as they are instead of rolling them onto something that cannot start.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

from tusk.operator.desired import ACCELERATOR_RESOURCES, WORKER_ROLES
from tusk.operator.kube import ApiError, Kube
from tusk.operator.spec import ModelDeploymentSpec, SecretRef


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, for the condition and the Event
    message: str


def _quantity(value: Any) -> float:
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(value))
    except (ValueError, TypeError):
        return 0.0


class NodeCapacity:
    """Largest allocatable count of each device resource on any node, cached briefly.

    With many ModelDeployments, one node list per interval is enough; when the operator may not
    list nodes (a namespace-scoped install without that permission) the check is skipped rather
    than failing every object.
    """

    def __init__(self, kube: Kube, ttl_s: float = 30.0) -> None:
        self.kube, self.ttl_s = kube, ttl_s
        self._at = -1e18
        self._max: dict[str, float] | None = None

    async def max_allocatable(self) -> dict[str, float] | None:
        if time.monotonic() - self._at > self.ttl_s:
            try:
                nodes = await self.kube.list("Node")
            except ApiError as exc:
                if exc.status not in (401, 403, 404):
                    raise
                self._max = None
            else:
                best: dict[str, float] = {}
                for node in nodes:
                    for resource, amount in ((node.get("status") or {}).get("allocatable") or {}).items():
                        best[resource] = max(best.get(resource, 0.0), _quantity(amount))
                self._max = best
            self._at = time.monotonic()
        return self._max


async def _check_secret(kube: Kube, namespace: str, ref: SecretRef, field: str) -> Problem | None:
    try:
        secret = await kube.get("Secret", namespace, ref.name)
    except ApiError as exc:
        if exc.status in (401, 403):
            return None  # cannot check; the pod will report it
        raise
    if secret is None:
        return Problem("SecretNotFound", f"{field}: Secret {ref.name!r} not found in namespace {namespace!r}")
    keys = set((secret.get("data") or {}).keys()) | set((secret.get("stringData") or {}).keys())
    if ref.key not in keys:
        return Problem("SecretKeyNotFound", f"{field}: Secret {ref.name!r} has no key {ref.key!r}")
    value = (secret.get("data") or {}).get(ref.key)
    if value is not None and not base64.b64decode(value or ""):
        return Problem("SecretKeyEmpty", f"{field}: key {ref.key!r} of Secret {ref.name!r} is empty")
    return None


async def check(
    kube: Kube, capacity: NodeCapacity, namespace: str, spec: ModelDeploymentSpec
) -> list[Problem]:
    problems: list[Problem] = []
    if spec.model.token_secret_ref is not None:
        problem = await _check_secret(kube, namespace, spec.model.token_secret_ref, "model.tokenSecretRef")
        if problem:
            problems.append(problem)
    external = spec.kv_tier.external
    if external is not None and external.secret_ref is not None:
        problem = await _check_secret(kube, namespace, external.secret_ref, "kvTier.external.secretRef")
        if problem:
            problems.append(problem)
    wanted = [(role, getattr(spec, role)) for role in WORKER_ROLES if getattr(spec, role).replicas > 0]
    if any(ACCELERATOR_RESOURCES[role_spec.accelerator] for _, role_spec in wanted):
        available = await capacity.max_allocatable()
        for role, role_spec in wanted:
            device = ACCELERATOR_RESOURCES[role_spec.accelerator]
            if device is None or available is None:
                continue
            have = available.get(device[0], 0.0)
            if have < role_spec.accelerators_per_replica:
                detail = "no node offers it" if have == 0 else f"the largest node offers {have:g}"
                problems.append(
                    Problem(
                        "AcceleratorUnavailable",
                        f"{role}: accelerator {role_spec.accelerator!r} needs "
                        f"{role_spec.accelerators_per_replica} x {device[0]} per pod, but {detail}",
                    )
                )
    return problems

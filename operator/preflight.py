"""Checks for specs that pass the schema but cannot work, or not yet, in this cluster.

A missing Secret or a volume mount naming no volume would otherwise show up as pods stuck in
``CreateContainerConfigError`` or a Deployment the server refuses, with nothing on the
ModelDeployment itself. Such a *blocking* problem becomes a Degraded reason with a message that says
what to fix, and the operator leaves the running children as they are. An accelerator that no
node offers today is only a *warning*: clusters that scale GPU node pools from zero
(cluster-autoscaler, Karpenter, GKE NAP) add the node only once a pod is Pending, so the children
are created anyway and the warning shows in its own condition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tusk.operator.desired import ACCELERATORS, RESERVED_VOLUMES, WORKER_ROLES
from tusk.operator.kube import ApiError, Kube
from tusk.operator.spec import ModelDeploymentSpec, RoleSpec, SecretRef


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, for the condition and the Event
    message: str
    # "block": Degraded, children left as they are; "degrade": Degraded, children still applied
    # (a failing pod must not stop the fix from rolling out); "warn": its own condition only.
    severity: str = "block"

    @property
    def blocking(self) -> bool:
        return self.severity == "block"


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
    """Existence only, from the Secret's metadata: the operator never reads Secret data. A missing
    key shows up later as the pod's CreateContainerConfigError, which status reports too."""
    try:
        secret = await kube.get("Secret", namespace, ref.name, metadata_only=True)
    except ApiError as exc:
        if exc.status in (401, 403):
            return None  # cannot check; the pod will report it
        raise
    if secret is None:
        return Problem("SecretNotFound", f"{field}: Secret {ref.name!r} not found in namespace {namespace!r}")
    return None


def _role_problems(role: str, role_spec: RoleSpec) -> list[Problem]:
    problems = []
    template = role_spec.pod_template
    misplaced = sorted(k for k in template if k not in ("metadata", "spec"))
    not_objects = sorted(
        k for k in ("metadata", "spec") if k in template and not isinstance(template[k], dict)
    )
    if misplaced or not_objects:
        problems.append(
            Problem(
                "InvalidPodTemplate",
                f"spec.{role}.podTemplate: a pod template patch has only the objects metadata and spec "
                f"(unexpected: {misplaced + not_objects})",
            )
        )
    names = [v.get("name") for v in role_spec.volumes]
    clashes = sorted({n for n in names if n in RESERVED_VOLUMES} | {n for n in names if names.count(n) > 1})
    if clashes:
        problems.append(
            Problem(
                "InvalidVolumes",
                f"spec.{role}.volumes: names {clashes} are duplicated or used by the operator "
                f"({', '.join(sorted(RESERVED_VOLUMES))})",
            )
        )
    known = set(names) | RESERVED_VOLUMES
    missing = sorted({m.get("name") for m in role_spec.volume_mounts if m.get("name") not in known}, key=str)
    if missing:
        problems.append(
            Problem(
                "InvalidVolumes",
                f"spec.{role}.volumeMounts: no volume named {missing} in spec.{role}.volumes",
            )
        )
    return problems


# Child names are "<name>-<suffix>"; Services must be DNS labels (63 characters), and the name is
# also a label value (63). The longest suffix is "-prefill" (8).
MAX_NAME_LENGTH = 63 - len("-prefill")


def name_problems(name: str) -> list[Problem]:
    """A ModelDeployment name too long for its children (the CRD cannot bound metadata.name)."""
    if len(name) <= MAX_NAME_LENGTH:
        return []
    return [
        Problem(
            "NameTooLong",
            f"metadata.name: {len(name)} characters; at most {MAX_NAME_LENGTH}, so that the Services "
            f"'{name[:12]}...-prefill' and the label tusk.dev/model stay within 63 characters",
        )
    ]


def spec_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """What the schema cannot see but the API server or the kubelet would refuse (pure)."""
    return [p for role in WORKER_ROLES for p in _role_problems(role, getattr(spec, role))]


async def check(
    kube: Kube, capacity: NodeCapacity, namespace: str, spec: ModelDeploymentSpec
) -> list[Problem]:
    problems: list[Problem] = spec_problems(spec)
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
    if any(ACCELERATORS[role_spec.accelerator].resource for _, role_spec in wanted):
        available = await capacity.max_allocatable()
        for role, role_spec in wanted:
            device = ACCELERATORS[role_spec.accelerator].resource
            if device is None or available is None:
                continue
            have = available.get(device, 0.0)
            if have < role_spec.accelerators_per_replica:
                detail = "no node offers it now" if have == 0 else f"the largest node offers {have:g}"
                problems.append(
                    Problem(
                        "AcceleratorUnavailable",
                        f"{role}: accelerator {role_spec.accelerator!r} needs "
                        f"{role_spec.accelerators_per_replica} x {device} per pod, but {detail}; "
                        "the pods stay Pending until a node with it joins (a node autoscaler adds one)",
                        severity="warn",
                    )
                )
    return problems

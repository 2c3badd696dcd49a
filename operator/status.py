"""The ModelDeployment status, computed from what the children report.

Pure: live children and known problems in, status dict out. Conditions follow the Kubernetes
conventions (type, status, reason, message, lastTransitionTime, observedGeneration) and keep their
transition time while their status stays the same, so ``kubectl wait --for=condition=Ready``
and alerting on Degraded behave as users expect.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from tusk.operator.desired import (
    Owner,
    child_name,
    kv_tier_url,
    selector_string,
    served_model_names,
)
from tusk.operator.preflight import Problem
from tusk.operator.spec import ModelDeploymentSpec


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    owner: Owner
    spec: ModelDeploymentSpec | None  # None when the spec does not parse
    live: dict[str, dict[str, Any]]  # "Kind name" -> live child
    problems: list[Problem]  # every severity: block, degrade and warn
    conflicts: list[str]
    changed: bool  # children were created or patched by this pass
    router_url: str | None = None


# Container waiting reasons that mean the pod will not serve without a change (kubelet's names).
FAILING_CONTAINER_REASONS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def pod_problems(pods: list[dict[str, Any]]) -> list[Problem]:
    """Failing worker pods as Degraded reasons (one per reason, naming the first pod and container),
    and pods the scheduler cannot place as a warning: the model stays up to date either way."""
    found: dict[str, Problem] = {}
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        role = (meta.get("labels") or {}).get("tusk.dev/role", "pod")
        containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in containers:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in FAILING_CONTAINER_REASONS and reason not in found:
                detail = waiting.get("message") or reason
                found[reason] = Problem(
                    reason,
                    f"{role} pod {meta.get('name')}, container {container.get('name')}: {detail}"[:400],
                    severity="degrade",
                )
        for cond in status.get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
                and "Unschedulable" not in found
            ):
                found["Unschedulable"] = Problem(
                    "Unschedulable",
                    f"{role} pod {meta.get('name')}: {cond.get('message') or 'no node fits'}"[:400],
                    severity="warn",
                )
    return list(found.values())


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _role(obs: Observation, role: str) -> dict[str, Any]:
    desired = getattr(obs.spec, role).replicas if obs.spec else 0
    deployment = obs.live.get(f"Deployment {child_name(obs.owner.name, role)}") or {}
    status = deployment.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    return {
        "replicas": int(status.get("replicas") or 0),
        "readyReplicas": ready,
        "updatedReplicas": int(status.get("updatedReplicas") or 0),
        "ready": f"{ready}/{desired}",
        "selector": selector_string(obs.owner, role),
    }


def _rollout_pending(obs: Observation, role: str) -> bool:
    desired = getattr(obs.spec, role).replicas
    deployment = obs.live.get(f"Deployment {child_name(obs.owner.name, role)}")
    if deployment is None:
        return desired > 0
    status = deployment.get("status") or {}
    observed = status.get("observedGeneration")
    generation = deployment.get("metadata", {}).get("generation")
    if observed is not None and generation is not None and observed < generation:
        return True
    return (
        any(
            int(status.get(key) or 0) < desired
            for key in ("updatedReplicas", "readyReplicas", "availableReplicas")
        )
        or int(status.get("replicas") or 0) > desired
    )


def _stuck(obs: Observation) -> Problem | None:
    for role in ("prefill", "decode"):
        deployment = obs.live.get(f"Deployment {child_name(obs.owner.name, role)}") or {}
        for cond in (deployment.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
                return Problem(
                    "RolloutStuck", f"{role}: {cond.get('message') or 'progress deadline exceeded'}"
                )
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                return Problem("ReplicaFailure", f"{role}: {cond.get('message') or cond.get('reason')}")
    return None


def _condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def conditions(obs: Observation, prefill: dict[str, Any], decode: dict[str, Any]) -> list[dict[str, Any]]:
    warnings = [p for p in obs.problems if p.severity == "warn"]
    blocking = [p for p in obs.problems if p.blocking]
    problems = [p for p in obs.problems if p.severity != "warn"]
    if obs.conflicts:
        problems.append(
            Problem(
                "ChildConflict",
                f"objects exist that this ModelDeployment does not own: {', '.join(obs.conflicts)}",
            )
        )
    stuck = _stuck(obs) if obs.spec else None
    if stuck:
        problems.append(stuck)
    paused = bool(obs.spec and obs.spec.paused)

    if decode["readyReplicas"] >= 1:
        ready = _condition("Ready", True, "Serving", f"{decode['readyReplicas']} decode worker(s) ready")
    elif obs.spec is None:
        ready = _condition("Ready", False, "InvalidSpec", "the spec cannot be served")
    elif obs.spec.decode.replicas == 0:
        ready = _condition("Ready", False, "ScaledToZero", "decode.replicas is 0: no worker serves the model")
    else:
        ready = _condition(
            "Ready", False, "NoDecodeWorkerReady", "waiting for a decode worker to become ready"
        )

    if paused:
        progressing = _condition(
            "Progressing", False, "Paused", "spec.paused is true: children are not changed"
        )
    elif obs.spec is None or blocking:
        progressing = _condition("Progressing", False, "Blocked", "fix the Degraded reason to continue")
    else:
        pending = [role for role in ("prefill", "decode") if _rollout_pending(obs, role)]
        if obs.changed or pending:
            roles = ", ".join(pending) or "children"
            progressing = _condition("Progressing", True, "RollingOut", f"rolling out {roles}")
        else:
            progressing = _condition("Progressing", False, "Complete", "all replicas updated and ready")

    if problems:
        degraded = _condition(
            "Degraded", True, problems[0].reason, "; ".join(f"{p.reason}: {p.message}" for p in problems)
        )
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problems found")
    if warnings:
        scheduling = _condition(
            "Schedulable", False, warnings[0].reason, "; ".join(f"{p.reason}: {p.message}" for p in warnings)
        )
    else:
        scheduling = _condition("Schedulable", True, "NoProblemFound", "no scheduling problem found")
    return [ready, progressing, degraded, scheduling]


def _carry_transition_times(new: list[dict[str, Any]], old: list[dict[str, Any]], now: str) -> None:
    previous = {c.get("type"): c for c in old or []}
    for cond in new:
        before = previous.get(cond["type"])
        same = before is not None and before.get("status") == cond["status"]
        cond["lastTransitionTime"] = before.get("lastTransitionTime", now) if same else now


def phase(conds: list[dict[str, Any]], paused: bool) -> str:
    by_type = {c["type"]: c["status"] == "True" for c in conds}
    ready_reason = next((c["reason"] for c in conds if c["type"] == "Ready"), "")
    if by_type.get("Degraded"):
        return "Degraded"
    if paused:
        return "Paused"
    if ready_reason == "ScaledToZero" and not by_type.get("Progressing"):
        return "ScaledToZero"
    if by_type.get("Ready") and not by_type.get("Progressing"):
        return "Ready"
    if by_type.get("Progressing"):
        return "Progressing"
    return "Pending"


def build_status(obs: Observation, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    previous = previous or {}
    prefill, decode = _role(obs, "prefill"), _role(obs, "decode")
    conds = conditions(obs, prefill, decode)
    _carry_transition_times(conds, previous.get("conditions") or [], now_iso())
    for cond in conds:
        cond["observedGeneration"] = obs.owner.generation
    status: dict[str, Any] = {
        "phase": phase(conds, bool(obs.spec and obs.spec.paused)),
        "observedGeneration": obs.owner.generation,
        "prefill": prefill,
        "decode": decode,
        "conditions": conds,
    }
    if obs.spec is not None:
        status["servedModelNames"] = served_model_names(obs.owner, obs.spec)
        status["kvTierUrl"] = kv_tier_url(obs.owner, obs.spec)
    status["endpoint"] = obs.router_url
    return status


def status_changed(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether writing ``new`` would change anything (ignoring fields the operator does not own)."""
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())

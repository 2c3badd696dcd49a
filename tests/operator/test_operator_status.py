"""Status computation: conditions, phase and transition times from what the children report."""

from __future__ import annotations

from tusk.operator.desired import Owner
from tusk.operator.preflight import Problem
from tusk.operator.spec import parse_spec
from tusk.operator.status import Observation, build_status, pod_problems

OWNER = Owner("m", "ns", "uid-1", generation=2)
SPEC = parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": 1}, "decode": {"replicas": 2}})


def _deployment(replicas: int, ready: int, updated: int | None = None, generation: int = 1, conditions=()):
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": list(conditions),
        },
    }


def _conds(status):
    return {c["type"]: c for c in status["conditions"]}


def test_all_ready_is_phase_ready() -> None:
    live = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(2, 2)}
    status = build_status(Observation(OWNER, SPEC, live, [], [], False, "http://r/v1"))
    conds = _conds(status)
    assert status["phase"] == "Ready" and status["observedGeneration"] == 2
    assert conds["Ready"]["status"] == "True" and conds["Progressing"]["reason"] == "Complete"
    assert status["decode"]["ready"] == "2/2" and status["prefill"]["ready"] == "1/1"
    assert status["endpoint"] == "http://r/v1"
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])


def test_rolling_update_serves_while_progressing() -> None:
    live = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(3, 2, updated=1)}
    status = build_status(Observation(OWNER, SPEC, live, [], [], False))
    conds = _conds(status)
    assert conds["Ready"]["status"] == "True"  # old workers keep serving during the rollout
    assert conds["Progressing"]["status"] == "True" and "decode" in conds["Progressing"]["message"]
    assert status["phase"] == "Progressing"


def test_stuck_rollout_and_problems_are_degraded() -> None:
    stuck = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "too slow",
    }
    live = {
        "Deployment m-prefill": _deployment(1, 1),
        "Deployment m-decode": _deployment(2, 0, conditions=[stuck]),
    }
    status = build_status(Observation(OWNER, SPEC, live, [], [], False))
    assert _conds(status)["Degraded"]["reason"] == "RolloutStuck" and status["phase"] == "Degraded"

    problem = Problem("SecretNotFound", "model.tokenSecretRef: Secret 'hf' not found")
    status = build_status(Observation(OWNER, SPEC, {}, [problem], ["Service m-decode"], False))
    degraded = _conds(status)["Degraded"]
    assert degraded["reason"] == "SecretNotFound"
    assert "ChildConflict" in degraded["message"] and "Secret 'hf' not found" in degraded["message"]
    assert _conds(status)["Progressing"]["reason"] == "Blocked"


def test_transition_time_kept_while_status_unchanged() -> None:
    live = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(2, 2)}
    first = build_status(Observation(OWNER, SPEC, live, [], [], False))
    for cond in first["conditions"]:
        cond["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = build_status(Observation(OWNER, SPEC, live, [], [], False), first)
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in again["conditions"])
    down = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(2, 0)}
    changed = build_status(Observation(OWNER, SPEC, down, [], [], False), first)
    assert _conds(changed)["Ready"]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    assert _conds(changed)["Degraded"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"


def test_invalid_spec_and_paused() -> None:
    status = build_status(Observation(OWNER, None, {}, [Problem("InvalidSpec", "bad")], [], False))
    assert status["phase"] == "Degraded" and _conds(status)["Ready"]["reason"] == "InvalidSpec"
    paused = parse_spec({"model": {"source": "tiny"}, "paused": True})
    status = build_status(Observation(OWNER, paused, {}, [], [], False))
    assert status["phase"] == "Paused" and _conds(status)["Progressing"]["reason"] == "Paused"


def test_scale_to_zero_is_its_own_phase() -> None:
    zero = parse_spec({"model": {"source": "tiny"}, "decode": {"replicas": 0}})
    live = {"Deployment m-prefill": _deployment(0, 0), "Deployment m-decode": _deployment(0, 0)}
    status = build_status(Observation(OWNER, zero, live, [], [], False))
    assert status["phase"] == "ScaledToZero"
    assert _conds(status)["Ready"] == {**_conds(status)["Ready"], "status": "False", "reason": "ScaledToZero"}
    assert _conds(status)["Degraded"]["status"] == "False"


def test_warnings_get_their_own_condition_and_do_not_block() -> None:
    warning = Problem("AcceleratorUnavailable", "decode: no node offers nvidia.com/gpu now", severity="warn")
    live = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(2, 2)}
    status = build_status(Observation(OWNER, SPEC, live, [warning], [], False))
    conds = _conds(status)
    assert (
        conds["Schedulable"]["status"] == "False"
        and conds["Schedulable"]["reason"] == "AcceleratorUnavailable"
    )
    assert conds["Degraded"]["status"] == "False" and conds["Progressing"]["reason"] == "Complete"
    assert status["phase"] == "Ready"


def _pod(name: str, waiting: str | None = None, init: bool = False, unschedulable: bool = False) -> dict:
    statuses = (
        [{"name": "worker", "state": {"waiting": {"reason": waiting, "message": "details"}}}]
        if waiting
        else []
    )
    status: dict = {"initContainerStatuses" if init else "containerStatuses": statuses}
    if unschedulable:
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: gpu",
            }
        ]
    return {"metadata": {"name": name, "labels": {"tusk.dev/role": "decode"}}, "status": status}


def test_failing_pods_become_degraded_reasons_but_do_not_block() -> None:
    pods = [
        _pod("a"),
        _pod("b", "CrashLoopBackOff"),
        _pod("c", "ErrImagePull", init=True),
        _pod("d", "CrashLoopBackOff"),
        _pod("e", "ContainerCreating"),  # normal start-up: not a problem
        _pod("f", unschedulable=True),
    ]
    problems = pod_problems(pods)
    assert [(p.reason, p.severity) for p in problems] == [
        ("CrashLoopBackOff", "degrade"),
        ("ErrImagePull", "degrade"),
        ("Unschedulable", "warn"),
    ]
    assert "decode pod b, container worker: details" in problems[0].message
    live = {"Deployment m-prefill": _deployment(1, 1), "Deployment m-decode": _deployment(2, 1)}
    status = build_status(Observation(OWNER, SPEC, live, problems, [], False))
    conds = _conds(status)
    assert conds["Degraded"]["reason"] == "CrashLoopBackOff" and status["phase"] == "Degraded"
    assert conds["Progressing"]["reason"] != "Blocked"  # a fix still rolls out
    assert conds["Schedulable"]["reason"] == "Unschedulable"
    assert pod_problems([_pod("x", "CreateContainerConfigError")])[0].reason == "CreateContainerConfigError"

"""Status computation: conditions, phase and transition times from what the children report."""

from __future__ import annotations

from tusk.operator.desired import Owner
from tusk.operator.preflight import Problem
from tusk.operator.spec import parse_spec
from tusk.operator.status import Observation, build_status

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

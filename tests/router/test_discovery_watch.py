"""Kubernetes discovery against a scripted API server: list+watch with resourceVersions, gaps,
410 Gone, in-order events, owner-chain trust, namespaces and live routing settings. Every test
ends by comparing the exact set of routing targets with what the cluster says."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from router_fake_cluster import FakeCluster, owner_ref
from tusk.router.discovery import KubernetesDiscovery

from tusk.config import RoutingConfig

WORKER_LABELS = {
    "app.kubernetes.io/part-of": "tusk",
    "app.kubernetes.io/name": "tusk-worker",
    "tusk.dev/model": "llama",
    "tusk.dev/role": "decode",
}


def wait(pred: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def pod(
    namespace: str,
    name: str,
    address: str,
    owner: dict[str, Any] | None,
    *,
    ready: bool = True,
    role: str = "decode",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    meta: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "labels": {**WORKER_LABELS, "tusk.dev/role": role, **(labels or {})},
        "annotations": annotations or {},
    }
    if owner is not None:
        meta["ownerReferences"] = [owner_ref(owner)]
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "worker", "ports": [{"name": "grpc", "containerPort": int(port)}]}]},
        "status": {
            "phase": "Running",
            "podIP": host,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class Setup:
    """A router (the harness's) plus discovery over a FakeCluster."""

    def __init__(self, harness, namespace: str | None = "ml", **routing: Any) -> None:
        self.harness = harness
        self.cluster = FakeCluster()
        self.router, self.url = harness.router([], wait_ready=False)
        self.disc = KubernetesDiscovery(
            self.router.registry,
            self.router.metrics,
            RoutingConfig(policy="round_robin", **routing),
            namespace=namespace,
            sources=self.cluster.sources(),
            poll_interval_s=0.1,
        )
        self.disc.min_backoff_s = 0.05
        harness.run(self.disc.start())

    def worker(self, model: str = "llama", **knobs: Any) -> tuple[Any, str]:
        w, endpoint = self.harness.worker(model=model, tokenizer_dir=self.harness.tokenizer_dir, **knobs)
        return w, endpoint.address

    def targets(self) -> set[tuple[str, str]]:
        """(model key, address) of every worker the router would route to: in the registry and
        healthy (a verified worker)."""
        return {
            (key, addr)
            for key, rt in self.router.registry.models.items()
            if "/" in key
            for addr, client in rt.clients.items()
            if client.state.healthy
        }

    def members(self) -> set[tuple[str, str]]:
        return {(k, a) for k, rt in self.router.registry.models.items() if "/" in k for a in rt.clients}

    def settle(self, expected: set[tuple[str, str]], what: str) -> None:
        wait(lambda: self.targets() == expected and self.members() == expected, f"{what}: {self.members()}")

    def close(self) -> None:
        self.harness.run(self.disc.stop(), timeout=30)


@pytest.fixture
def setup(harness):
    made: list[Setup] = []

    def make(**kwargs: Any) -> Setup:
        s = Setup(harness, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_list_then_watch_follows_adds_and_deletes(setup) -> None:
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    _, a1 = s.worker()
    _, a2 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, rs))  # before the router listed: comes in the list
    s.settle({("ml/llama", a1)}, "listed pod")
    s.cluster.put("pods", pod("ml", "p2", a2, rs))
    s.settle({("ml/llama", a1), ("ml/llama", a2)}, "watched pod")
    resp = httpx.post(f"{s.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["model"] == "llama"
    s.cluster.delete("pods", "ml", "p1")
    s.settle({("ml/llama", a2)}, "deleted pod")
    assert [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]] == ["tiny", "llama"]
    assert s.cluster.lists == {"pods": 1, "models": 1}  # one list each, the rest watched


def test_a_gap_with_a_deletion_resumes_the_watch_and_drops_the_pod(setup) -> None:
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    _, a1 = s.worker()
    _, a2 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, rs))
    s.cluster.put("pods", pod("ml", "p2", a2, rs))
    s.settle({("ml/llama", a1), ("ml/llama", a2)}, "start")
    s.cluster.outage(True)  # the watch drops; reconnects fail for a while
    s.cluster.delete("pods", "ml", "p1")
    time.sleep(0.2)
    assert ("ml/llama", a1) in s.members()  # nothing can be known during the outage
    s.cluster.outage(False)
    s.settle({("ml/llama", a2)}, "after the gap")
    assert s.cluster.lists["pods"] == 1  # resumed from its resourceVersion: the history replayed


def test_410_gone_lists_again_and_drops_what_disappeared(setup) -> None:
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    _, a1 = s.worker()
    _, a2 = s.worker()
    _, a3 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, rs))
    s.cluster.put("pods", pod("ml", "p2", a2, rs))
    s.settle({("ml/llama", a1), ("ml/llama", a2)}, "start")
    s.cluster.outage(True)
    s.cluster.delete("pods", "ml", "p1")
    s.cluster.put("pods", pod("ml", "p3", a3, rs))
    s.cluster.compact()  # the history of the gap is gone: resuming gets 410
    s.cluster.outage(False)
    s.settle({("ml/llama", a2), ("ml/llama", a3)}, "after the relist")
    assert s.cluster.lists["pods"] == 2


def test_an_owner_lookup_that_fails_is_retried_not_skipped(setup) -> None:
    """The owner GETs happen before an event is applied; when they fail, the list is taken
    again or the watch resumes before that event, so the pod is not lost."""
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    _, a1 = s.worker()
    _, a2 = s.worker()
    s.cluster.failing_gets = 1  # while a watch event is resolved
    s.cluster.put("pods", pod("ml", "p1", a1, rs))
    s.settle({("ml/llama", a1)}, "watched pod")
    s.cluster.outage(True)
    s.cluster.put("pods", pod("ml", "p2", a2, s.cluster.replica_set_of(md, role="prefill")))
    s.cluster.compact()
    s.cluster.failing_gets = 1  # while the relist is resolved
    s.cluster.outage(False)
    s.settle({("ml/llama", a1), ("ml/llama", a2)}, "relisted pod")
    assert s.cluster.lists["pods"] == 3  # the first, the one that failed, the one that worked


def test_a_label_change_and_a_readiness_flap_never_lose_the_worker(setup) -> None:
    """The events arrive back to back; each is applied in order, so the worker that is back
    Ready at the end is a target at the end (and stays one)."""
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    _, a1 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, rs))
    s.settle({("ml/llama", a1)}, "start")
    for _ in range(3):
        s.cluster.put("pods", pod("ml", "p1", a1, rs, ready=False))
        s.cluster.put("pods", pod("ml", "p1", a1, rs, ready=True))
    s.cluster.put("pods", pod("ml", "p1", a1, rs, labels={"rollout": "b"}))  # an unrelated label
    s.cluster.put("pods", pod("ml", "p1", a1, rs, role="both"))  # the role label changes
    wait(lambda: s.router.registry.models["ml/llama"].clients[a1].state.role.value == "both", "role")
    time.sleep(0.5)  # a removal scheduled for later (the old race) would land in here
    s.settle({("ml/llama", a1)}, "after the flaps")
    resp = httpx.post(f"{s.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200


def test_foreign_and_forged_pods_get_no_traffic_and_are_logged_once(setup, caplog) -> None:
    s = setup()
    md = s.cluster.model_deployment("ml", "llama")
    rs = s.cluster.replica_set_of(md)
    other_md = s.cluster.model_deployment("other", "llama")
    other_rs = s.cluster.replica_set_of(other_md)
    _, good = s.worker()
    _, foreign = s.worker()
    _, forged = s.worker()
    _, wrong_uid = s.worker()
    caplog.set_level(logging.WARNING, logger="tusk.router.discovery")
    s.cluster.put("pods", pod("ml", "good", good, rs))
    # Another namespace, with a perfect owner chain there: not watched.
    s.cluster.put("pods", pod("other", "tenant", foreign, other_rs))
    # The worker labels and the old served-names annotation, but no owner at all.
    forged_pod = pod("ml", "forged", forged, None, annotations={"tusk.dev/served-model-names": "llama"})
    s.cluster.put("pods", forged_pod)
    # An owner reference that names the real ReplicaSet but not its uid.
    fake_rs = {**rs, "metadata": {**rs["metadata"], "uid": "not-the-real-uid"}}
    s.cluster.put("pods", pod("ml", "wrong-uid", wrong_uid, fake_rs))
    for _ in range(3):  # more events for the same pods: still one log line each
        s.cluster.put("pods", pod("ml", "forged", forged, None))
        s.cluster.put("pods", pod("ml", "wrong-uid", wrong_uid, fake_rs))
    s.settle({("ml/llama", good)}, "only the owned pod")
    time.sleep(0.3)
    assert s.targets() == {("ml/llama", good)}
    untrusted = [r for r in caplog.records if "no ModelDeployment owns" in r.getMessage()]
    assert sorted(r.pod for r in untrusted) == ["ml/forged", "ml/wrong-uid"]
    foreign_logs = [r for r in caplog.records if "outside the watched namespace" in r.getMessage()]
    assert len(foreign_logs) == 1


def test_same_named_models_in_two_namespaces_never_merge(setup) -> None:
    s = setup(namespace=None)
    a_md = s.cluster.model_deployment("team-a", "llama")
    b_md = s.cluster.model_deployment("team-b", "llama")
    wa, aa = s.worker()
    wb, ab = s.worker()
    s.cluster.put("pods", pod("team-a", "p", aa, s.cluster.replica_set_of(a_md)))
    s.cluster.put("pods", pod("team-b", "p", ab, s.cluster.replica_set_of(b_md)))
    s.settle({("team-a/llama", aa), ("team-b/llama", ab)}, "two models")
    body = {"prompt": "x", "max_tokens": 2}
    ambiguous = httpx.post(f"{s.url}/v1/completions", json={**body, "model": "llama"})
    assert ambiguous.status_code == 400 and ambiguous.json()["error"]["code"] == "model_ambiguous"
    assert "team-a/llama" in ambiguous.json()["error"]["message"]
    for _ in range(2):
        assert (
            httpx.post(f"{s.url}/v1/completions", json={**body, "model": "team-b/llama"}).status_code == 200
        )
    assert len(wb.s.generate_calls) == 2 and not wa.s.generate_calls
    listed = {m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]}
    assert {"team-a/llama", "team-b/llama"} <= listed and "llama" not in listed
    s.cluster.delete("models", "team-a", "llama")  # the other namespace's model goes away
    s.settle({("team-b/llama", ab)}, "one model left")
    assert httpx.post(f"{s.url}/v1/completions", json={**body, "model": "llama"}).status_code == 200


def test_routing_follows_the_model_deployment_and_a_bad_setting_keeps_the_last_good(setup, caplog) -> None:
    s = setup()
    md = s.cluster.model_deployment("ml", "llama", routing={"policy": "least_request"})
    _, a1 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, s.cluster.replica_set_of(md)))
    s.settle({("ml/llama", a1)}, "start")
    runtime = s.router.registry.models["ml/llama"]
    assert runtime.default_policy.name == "least_request"
    md["spec"]["routing"] = {"policy": "cache_aware"}
    s.cluster.put("models", md)
    wait(lambda: runtime.default_policy.name == "cache_aware", "policy never changed")
    caplog.set_level(logging.WARNING, logger="tusk.router.discovery")
    for bad in ({"policy": "no-such-policy"}, {"policy": "cost", "disaggregationThreshold": -1}):
        md["spec"]["routing"] = bad
        s.cluster.put("models", md)
    wait(lambda: len([r for r in caplog.records if "keeping the last good" in r.getMessage()]) == 2, "no log")
    errors = [r.error for r in caplog.records if "keeping the last good" in r.getMessage()]
    assert "spec.routing.policy" in errors[0] and "no-such-policy" in errors[0]
    assert errors[1].startswith("spec.routing.disaggregationThreshold")
    assert runtime.default_policy.name == "cache_aware"  # the model stays online, as it was
    s.settle({("ml/llama", a1)}, "still serving")
    assert s.router.registry.models["ml/llama"] is runtime  # no restart, no rebuild
    resp = httpx.post(f"{s.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200


def test_a_worker_that_is_not_what_its_model_deployment_says_gets_no_traffic(setup, caplog) -> None:
    s = setup()
    caplog.set_level(logging.WARNING)
    md = s.cluster.model_deployment("ml", "llama", blockSize=16)
    rs = s.cluster.replica_set_of(md)
    _, good = s.worker()
    _, other_model = s.worker(model="mistral")
    _, other_block = s.worker(block_size=32)
    for i, address in enumerate((other_model, good, other_block)):
        s.cluster.put("pods", pod("ml", f"p{i}", address, rs))
    wait(lambda: s.targets() == {("ml/llama", good)}, "only the matching worker serves")
    time.sleep(0.5)  # several health polls: the others stay out
    assert s.targets() == {("ml/llama", good)}
    errors = " ".join(str(getattr(r, "error", "")) for r in caplog.records)
    assert "serves model 'mistral'" in errors and "block size 32, expected 16" in errors
    for _ in range(5):
        resp = httpx.post(f"{s.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
        assert resp.status_code == 200


def test_model_deployment_settings_reach_the_policy_live_and_an_unknown_one_keeps_the_last_good(
    setup, caplog
) -> None:
    s = setup()
    routing = {"policy": "cache_aware", "settings": {"cache_threshold": 0.7, "balance_abs_threshold": 8}}
    md = s.cluster.model_deployment("ml", "llama", routing=routing)
    _, a1 = s.worker()
    s.cluster.put("pods", pod("ml", "p1", a1, s.cluster.replica_set_of(md)))
    s.settle({("ml/llama", a1)}, "start")
    runtime = s.router.registry.models["ml/llama"]
    assert runtime.default_policy.name == "cache_aware"
    assert (runtime.default_policy.cache_threshold, runtime.default_policy.balance_abs_threshold) == (0.7, 8)
    md["spec"]["routing"] = {"policy": "cache_aware", "settings": {"cache_threshold": 0.2}}
    s.cluster.put("models", md)
    wait(lambda: runtime.default_policy.cache_threshold == 0.2, "setting never changed")
    assert runtime.default_policy.balance_abs_threshold == 64  # unset again: the policy's default
    good = runtime.default_policy
    caplog.set_level(logging.WARNING, logger="tusk.router.discovery")
    bad_settings = (
        {"cache_treshold": 0.9},  # a typo
        {"cache_threshold": "high"},  # a bad value
        {"disaggregation_threshold_tokens": 5},  # that knob is spec.routing.disaggregationThreshold
    )
    for bad in bad_settings:
        md["spec"]["routing"] = {"policy": "cache_aware", "settings": bad}
        s.cluster.put("models", md)
    wait(lambda: len([r for r in caplog.records if "keeping the last good" in r.getMessage()]) == 3, "no log")
    errors = [r.error for r in caplog.records if "keeping the last good" in r.getMessage()]
    assert errors[0].startswith("spec.routing.settings.cache_treshold: not a routing setting")
    assert "cache_threshold" in errors[0]  # the valid names are listed
    assert errors[1].startswith("spec.routing.settings.cache_threshold:")
    assert errors[2].startswith("spec.routing.settings.disaggregation_threshold_tokens:")
    assert runtime.default_policy is good and good.cache_threshold == 0.2  # last good, untouched
    assert s.router.registry.models["ml/llama"] is runtime
    resp = httpx.post(f"{s.url}/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200

"""The operator against a real API server (kind, k3d, any cluster): opt-in, needs KUBECONFIG.

Runs ``kubectl apply`` for the CRD and ModelDeployments and runs the operator as a subprocess
(``python -m tusk.operator``), scoped to a throw-away namespace. Workers need not become ready
(no model image is assumed); the suite checks what the API server does that the emulator cannot:
CEL validation, defaulting, the scale subresource, status isolation and garbage collection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tusk.operator import manifests

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _kubectl_binary() -> str | None:
    return shutil.which("kubectl") or next(
        (str(p) for p in [REPO / ".tools" / "bin" / "kubectl"] if p.is_file() and os.access(p, os.X_OK)), None
    )


def _cluster_reachable(kubectl: str) -> bool:
    try:
        result = subprocess.run(
            [kubectl, "version", "--request-timeout=5s", "-o", "json"], capture_output=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and b"serverVersion" in result.stdout


@pytest.fixture(scope="module")
def kubectl() -> str:
    config = os.environ.get("KUBECONFIG")
    if not config or not Path(config.split(os.pathsep)[0]).is_file():
        pytest.skip("KUBECONFIG does not point at a kubeconfig file")
    binary = _kubectl_binary()
    if binary is None:
        pytest.skip("kubectl not found on PATH or in .tools/bin")
    if not _cluster_reachable(binary):
        pytest.skip("the cluster in KUBECONFIG is not reachable")
    return binary


def run(
    kubectl: str, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run([kubectl, *args], input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def get(kubectl: str, namespace: str, *what: str) -> dict | None:
    result = run(kubectl, "-n", namespace, "get", *what, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_for(check, timeout: float = 60.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def namespace(kubectl: str) -> Iterator[str]:
    documents = [manifests.crd(), *manifests.peering_crds()]
    run(kubectl, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))
    run(kubectl, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{manifests.CRD_NAME}")
    name = f"tusk-e2e-{uuid.uuid4().hex[:6]}"
    run(kubectl, "create", "namespace", name)
    # Every pod the operator creates must be admitted where the restricted standard is enforced.
    run(kubectl, "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    run(kubectl, "delete", "namespace", name, "--wait=false", check=False)


class Operator:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "tusk.operator", "--standalone", "--namespace", self.namespace]
        args += ["--health-port", "0", "--resync-seconds", "2"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def operator(namespace: str) -> Iterator[Operator]:
    op = Operator(namespace)
    op.start()
    yield op
    op.stop()


def model_deployment(name: str, **spec) -> str:
    body = {
        "apiVersion": "tusk.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"source": "tiny"}, **spec},
    }
    return yaml.safe_dump(body)


def test_cel_rules_reject_bad_specs(kubectl: str, namespace: str) -> None:
    for name, spec, words in [
        ("tp", {"decode": {"acceleratorsPerReplica": 2}}, "tensor parallelism is not supported yet"),
        ("both", {"kvTier": {"managed": {}, "external": {"url": "redis://x:6379"}}}, "not both"),
        ("policy", {"routing": {"policy": "nonexistent"}}, "spec.routing.policy"),
        ("backend", {"engine": {"kernelBackend": "cuda-magic"}}, "spec.engine.kernelBackend"),
        (
            "memory",
            {"decode": {"resources": {"limits": {"memory": "lots"}}}},
            "spec.decode.resources.limits.memory",
        ),
    ]:
        bad = model_deployment(name, **spec)
        result = run(kubectl, "-n", namespace, "apply", "-f", "-", stdin=bad, check=False)
        assert result.returncode != 0 and words in result.stderr, (name, result.stderr)


def test_examples_and_a_minimal_spec_are_accepted(kubectl: str, namespace: str) -> None:
    """Every example passes the server's validation; a bare spec is stored with the CRD defaults."""
    examples = REPO / "deploy" / "examples"
    run(kubectl, "-n", namespace, "apply", "--dry-run=server", "-f", str(examples))
    run(kubectl, "-n", namespace, "apply", "-f", "-", stdin=model_deployment("minimal"))
    spec = get(kubectl, namespace, "md", "minimal")["spec"]
    assert spec["decode"]["replicas"] == 1 and spec["prefill"]["replicas"] == 0
    assert spec["model"]["cache"] == {"sizeLimit": "20Gi"}
    assert spec["decode"]["rollout"] == {"maxSurge": 0, "maxUnavailable": 1}
    run(kubectl, "-n", namespace, "scale", "md/minimal", "--replicas=0")
    assert get(kubectl, namespace, "md", "minimal")["spec"]["decode"]["replicas"] == 0
    run(kubectl, "-n", namespace, "delete", "md", "minimal", "--timeout=60s")


def test_lifecycle(kubectl: str, namespace: str, operator: Operator) -> None:
    run(kubectl, "-n", namespace, "apply", "-f", "-", stdin=model_deployment("e2e", prefill={"replicas": 1}))
    md = get(kubectl, namespace, "md", "e2e")
    assert md["spec"]["kvTier"] == {
        "managed": {
            "replicas": 1,
            "memory": "1Gi",
            "maxmemoryPolicy": "allkeys-lru",
            "image": "valkey/valkey:8.1.4",
        }
    }
    for kind, name in [
        ("deployment", "e2e-decode"),
        ("deployment", "e2e-prefill"),
        ("deployment", "e2e-kv"),
        ("service", "e2e-decode"),
        ("networkpolicy", "e2e-kv"),
        ("secret", "e2e-kv-auth"),
        ("pdb", "e2e-decode"),
    ]:
        wait_for(lambda k=kind, n=name: get(kubectl, namespace, k, n), what=f"{kind}/{name}")
    status = wait_for(
        lambda: (get(kubectl, namespace, "md", "e2e") or {}).get("status", {}).get("conditions"),
        what="status",
    )
    assert {c["type"] for c in status} == {"Ready", "Progressing", "Degraded", "Schedulable"}
    # One content-named config per role.
    configs = get(
        kubectl, namespace, "configmaps", "-l", "tusk.dev/model=e2e,app.kubernetes.io/component=config"
    )
    assert len(configs["items"]) == 2

    # Scale through the scale subresource.
    run(kubectl, "-n", namespace, "scale", "md/e2e", "--replicas=2")
    wait_for(
        lambda: get(kubectl, namespace, "deployment", "e2e-decode")["spec"]["replicas"] == 2, what="scaled"
    )

    # Drift repair.
    run(kubectl, "-n", namespace, "scale", "deployment/e2e-decode", "--replicas=5")
    wait_for(
        lambda: get(kubectl, namespace, "deployment", "e2e-decode")["spec"]["replicas"] == 2, what="repaired"
    )

    # Restart: same children (same uids), nothing duplicated.
    uid = get(kubectl, namespace, "deployment", "e2e-decode")["metadata"]["uid"]
    operator.stop()
    operator.start()
    time.sleep(6)
    assert get(kubectl, namespace, "deployment", "e2e-decode")["metadata"]["uid"] == uid
    deployments = get(kubectl, namespace, "deployments", "-l", "tusk.dev/model=e2e")["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["e2e-decode", "e2e-kv", "e2e-prefill"]

    # A missing Secret degrades this object only.
    run(
        kubectl,
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        stdin=model_deployment(
            "nosecret", model={"source": "hf://org/m", "tokenSecretRef": {"name": "absent"}}
        ),
    )
    wait_for(
        lambda: any(
            c["type"] == "Degraded" and c["status"] == "True" and c["reason"] == "SecretNotFound"
            for c in (get(kubectl, namespace, "md", "nosecret") or {}).get("status", {}).get("conditions", [])
        ),
        what="Degraded SecretNotFound",
    )

    # Delete: children go too.
    run(kubectl, "-n", namespace, "delete", "md", "e2e", "nosecret", "--timeout=60s")
    wait_for(
        lambda: not get(kubectl, namespace, "deployments", "-l", "tusk.dev/model=e2e")["items"],
        what="children deleted",
    )


def test_operator_pods_are_admitted_under_restricted(
    kubectl: str, namespace: str, operator: Operator
) -> None:
    """The namespace enforces the restricted Pod Security Standard: the ReplicaSets get their pods
    (workers, init container for image://, managed Valkey), whether or not the images can be pulled."""
    run(
        kubectl,
        "-n",
        namespace,
        "apply",
        "-f",
        "-",
        stdin=model_deployment("psa", model={"source": "image://busybox:1.36", "imagePath": "/bin"}),
    )

    def pods_by_component() -> set[str]:
        pods = get(kubectl, namespace, "pods", "-l", "tusk.dev/model=psa") or {"items": []}
        return {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods["items"]}

    wait_for(lambda: {"decode", "kv-tier"} <= pods_by_component(), timeout=120, what="pods admitted")
    for rs in (get(kubectl, namespace, "replicasets", "-l", "tusk.dev/model=psa") or {"items": []})["items"]:
        failures = [c for c in rs.get("status", {}).get("conditions") or [] if c["type"] == "ReplicaFailure"]
        assert not failures, failures
    run(kubectl, "-n", namespace, "delete", "md", "psa", "--timeout=60s")

"""`kubectl apply --dry-run=client` over everything the chart renders and the example resources.

Client dry-run still asks an API server for discovery (to map kinds to resources) and for the
current object (to compute the patch), so it cannot run against nothing. Here it runs against
kmock's Kubernetes emulator on loopback, which serves discovery for the built-in kinds plus the
kinds this chart uses from CRDs. Schema validation is kubernetes-validate's job
(test_chart_render), hence --validate=false: the emulator serves no OpenAPI document.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest
import yaml
from chartkit import (
    EXAMPLES_DIR,
    KUBE_VERSION,
    NAMESPACE,
    SCENARIO_IDS,
    SCENARIOS,
    Tools,
    parse_documents,
    template_args,
)

# Kinds served by CRDs that are not in the chart (the Prometheus Operator's).
PROMETHEUS_OPERATOR_KINDS = {
    "monitoring.coreos.com/v1/servicemonitors": ("ServiceMonitor", "servicemonitor"),
    "monitoring.coreos.com/v1/podmonitors": ("PodMonitor", "podmonitor"),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# kmock's bundled resource list is read with a deprecated importlib.resources call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")


class _Emulator(kmock.KubernetesEmulator):
    """kmock 0.8 answers /api/v1 with groupVersion "/v1"; kubectl then finds no core kinds."""

    async def _serve_version(self, request):
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _serve_server_version(self, request):
        """A Kubernetes the chart supports (kmock says 1.26, which Chart.yaml's kubeVersion refuses)."""
        payload = await super()._serve_server_version(request)
        major, minor, _ = KUBE_VERSION.split(".")
        return {**payload, "major": major, "minor": minor, "gitVersion": f"v{KUBE_VERSION}"}


class EmulatedCluster:
    """A kmock API server on a loopback port, run by its own event loop in a thread."""

    def __init__(self, crds: list[dict]) -> None:
        self._crds = crds
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self.url = ""

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with _Emulator() as k8s, kmock.Server(k8s) as server:
            k8s.resources.load_bundled()
            for crd in self._crds:
                spec = crd["spec"]
                for version in spec["versions"]:
                    k8s.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = (
                        k8s.ResourceInfo(
                            kind=spec["names"]["kind"],
                            singular=spec["names"]["singular"],
                            namespaced=spec["scope"] == "Namespaced",
                            shortnames=set(spec["names"].get("shortNames", [])),
                            verbs=VERBS,
                        )
                    )
            for key, (kind, singular) in PROMETHEUS_OPERATOR_KINDS.items():
                k8s.resources[key] = k8s.ResourceInfo(
                    kind=kind, singular=singular, namespaced=True, verbs=VERBS
                )
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": "unused"}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "tester", "namespace": NAMESPACE},
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path


@pytest.fixture(scope="module")
def cluster(tools: Tools, tmp_path_factory) -> Iterator[tuple[EmulatedCluster, Path]]:
    rendered = parse_documents(tools.run(tools.helm, *template_args(SCENARIOS[0], "--include-crds")).stdout)
    crds = [o for o in rendered if o["kind"] == "CustomResourceDefinition"]
    with EmulatedCluster(crds) as emulated:
        yield emulated, emulated.kubeconfig(tmp_path_factory.mktemp("kube") / "config")


def _kubectl(tools: Tools, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    return subprocess.run([str(tools.kubectl), *args], capture_output=True, text=True, timeout=60, env=env)


def _dry_run_apply(tools: Tools, kubeconfig: Path, manifest: Path) -> list[str]:
    proc = _kubectl(
        tools, kubeconfig, "apply", "--dry-run=client", "--validate=false", "-o", "name", "-f", str(manifest)
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _expected_names(objects: list[dict]) -> list[str]:
    names = []
    for o in objects:
        group = o["apiVersion"].rpartition("/")[0]
        kind = o["kind"].lower()
        names.append(
            f"{kind}.{group}/{o['metadata']['name']}" if group else f"{kind}/{o['metadata']['name']}"
        )
    return names


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_rendered_chart_applies_with_client_dry_run(tools, cluster, tmp_path, scenario):
    _, kubeconfig = cluster
    text = tools.run(tools.helm, *template_args(scenario, "--include-crds")).stdout
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(text)
    applied = _dry_run_apply(tools, kubeconfig, manifest)
    assert sorted(applied) == sorted(_expected_names(parse_documents(text)))


def test_examples_apply_with_client_dry_run(tools, cluster):
    _, kubeconfig = cluster
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        applied = _dry_run_apply(tools, kubeconfig, path)
        assert applied == _expected_names(parse_documents(path.read_text())), path.name


def test_dry_run_rejects_a_kind_the_cluster_does_not_serve(tools, cluster, tmp_path):
    """The emulator is a real check: an unknown kind fails like on a cluster without the CRD."""
    _, kubeconfig = cluster
    manifest = tmp_path / "unknown.yaml"
    manifest.write_text(
        "apiVersion: tusk.dev/v1alpha1\nkind: ModelDeploymentz\nmetadata: {name: x}\nspec: {}\n"
    )
    proc = _kubectl(tools, kubeconfig, "apply", "--dry-run=client", "--validate=false", "-f", str(manifest))
    assert proc.returncode != 0
    assert "no matches for kind" in proc.stderr


def test_autoscaling_upgrade_keeps_the_live_router_count(tools, cluster, tmp_path):
    """Turning the HPA on (or any upgrade with it on) renders the Deployment's live replica count,
    which `lookup` reads from the API server: never the API server's default of 1 that a missing
    spec.replicas would leave after helm's three-way merge, and never a reset of the HPA's choice."""
    from chartkit import CHART, RELEASE, _isolated_env

    _, kubeconfig = cluster
    namespace = "hpa-upgrade"
    live = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{RELEASE}-router",
            "namespace": namespace,
            # What the previous release left: helm checks ownership before it renders over it.
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {
                "meta.helm.sh/release-name": RELEASE,
                "meta.helm.sh/release-namespace": namespace,
            },
        },
        "spec": {
            "replicas": 5,
            "selector": {"matchLabels": {"app": "router"}},
            "template": {
                "metadata": {"labels": {"app": "router"}},
                "spec": {"containers": [{"name": "r", "image": "r"}]},
            },
        },
    }
    manifest = tmp_path / "live.yaml"
    manifest.write_text(yaml.safe_dump(live))
    created = _kubectl(tools, kubeconfig, "create", "--validate=false", "-f", str(manifest))
    assert created.returncode == 0, created.stderr

    def replicas(*settings: str) -> int:
        args = ["template", RELEASE, str(CHART), "--namespace", namespace, "--dry-run=server",
                "--disable-openapi-validation", "--show-only", "templates/router/deployment.yaml", *settings]  # fmt: skip
        env = {**_isolated_env(), "KUBECONFIG": str(kubeconfig)}
        proc = subprocess.run([str(tools.helm), *args], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        (deployment,) = parse_documents(proc.stdout)
        return deployment["spec"]["replicas"]

    assert replicas("--set", "router.autoscaling.enabled=true") == 5
    assert (
        replicas("--set", "router.autoscaling.enabled=true", "--set", "router.autoscaling.minReplicas=6") == 6
    )
    assert replicas() == 2, "without the HPA the chart's fixed count applies"

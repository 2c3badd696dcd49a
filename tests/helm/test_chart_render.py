"""The chart lints, renders in every supported shape, and what it renders is valid and locked down."""

from __future__ import annotations

import json
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartkit import (
    CHART,
    KUBE_VERSION,
    MONITORING_API,
    NAMESPACE,
    RELEASE,
    SCENARIO_IDS,
    SCENARIOS,
    VALUES_DIR,
    Scenario,
    by_kind,
    one,
    pod_specs,
    template_args,
)
from tusk.operator.main import build_parser

from tusk.config import RouterConfig
from tusk.kvserver import server_args

# Kinds whose schema is a CRD, not part of Kubernetes: kubernetes-validate has no schema for them.
# kopf.dev peerings are checked against the CRDs in the chart's crds/ folder; the Prometheus
# Operator's kinds (its CRDs are not ours to vendor) are checked field by field in
# test_servicemonitor_needs_both_the_switch_and_the_api.
CRD_TYPED_GROUPS = {"monitoring.coreos.com", "kopf.dev"}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_helm_lint_strict(tools, scenario: Scenario):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for name in scenario.values:
        args += ["--values", str(VALUES_DIR / name)]
    out = tools.run(tools.helm, *args).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_helm_v3_lints_and_renders_what_helm_v4_renders(tools, render, scenario: Scenario):
    """Users still run helm v3: the chart lints strictly there and renders the same objects."""
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for name in scenario.values:
        args += ["--values", str(VALUES_DIR / name)]
    assert "0 chart(s) failed" in tools.run(tools.helm3, *args).stdout
    v3 = [o for o in yaml.safe_load_all(tools.run(tools.helm3, *template_args(scenario)).stdout) if o]
    assert v3 == render(scenario)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_every_object_is_valid_kubernetes(render, scenario: Scenario):
    objects = render(scenario, "--include-crds")
    chart_crds: dict[str, dict[str, dict]] = {}
    for crd in by_kind(objects, "CustomResourceDefinition"):
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        kinds = chart_crds.setdefault(crd["spec"]["group"], {})
        kinds[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    checked = 0
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CRD_TYPED_GROUPS:
            if group in chart_crds:
                jsonschema.validate(obj, chart_crds[group][obj["kind"]])
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid at {KUBE_VERSION}: {exc}")
        checked += 1
    assert checked >= 12


def test_oldest_supported_kubernetes_accepts_every_object(render, tools):
    """Chart.yaml promises 1.29+: everything (all options on) validates against 1.29's schemas,
    and helm refuses older clusters instead of failing half-way through an install."""
    objects = render(SCENARIOS[-1], "--kube-version", "1.29.0")
    for obj in objects:
        if obj["apiVersion"].rpartition("/")[0] not in CRD_TYPED_GROUPS:
            kubernetes_validate.validate(obj, "1.29.0", strict=True)
    proc = tools.run(tools.helm, *template_args(SCENARIOS[0], "--kube-version", "1.28.9"), check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_values_schema_rejects_typos_and_bad_values(tools):
    bad = {
        "router.replicass=2": "additional properties",
        "kvTier.externalUrl=http://cache:6379": "externalUrl",
        "kvTier.maxmemoryPolicy=lru": "maxmemoryPolicy",
        "operator.namespaces[0]=Not_A_Namespace": "namespaces",
    }
    for setting, message in bad.items():
        proc = tools.run(tools.helm, *template_args(SCENARIOS[0], "--set", setting), check=False)
        assert proc.returncode != 0, setting
        assert message in proc.stderr, proc.stderr


def test_objects_land_in_the_release_namespace(render):
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"}
    for obj in render(SCENARIOS[0]):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=SCENARIO_IDS)
def test_pods_are_non_root_read_only_and_capability_free(render, scenario: Scenario):
    specs = pod_specs(render(scenario))
    assert len(specs) >= 3
    for name, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, name
        assert pod_sc.get("runAsUser", 0) != 0, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert container["resources"].get("requests"), f"{where} has no resource requests"
            image = container["image"]
            assert re.fullmatch(r"[\w.\-/]+(:[\w.\-]+)", image), f"{where}: image {image!r} has no tag"
            assert not image.endswith(":latest"), where


def test_deployment_selectors_match_their_pods_and_services_find_them(render):
    objects = render(SCENARIOS[1])
    deployments = by_kind(objects, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        f"{RELEASE}-operator",
        f"{RELEASE}-router",
        f"{RELEASE}-kv",
    }
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), d["metadata"]["name"]
    for svc in by_kind(objects, "Service"):
        matches = [
            d
            for d in deployments
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} Deployments"
        ports = {
            p["name"]
            for c in matches[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, svc["metadata"]["name"]


def test_disruption_budgets_cover_operator_router_and_tier(render):
    objects = render(SCENARIOS[1])
    pdbs = by_kind(objects, "PodDisruptionBudget")
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    assert {p["metadata"]["name"] for p in pdbs} == set(deployments)
    for pdb in pdbs:
        labels = deployments[pdb["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    router_pdb = one(pdbs, "PodDisruptionBudget", f"{RELEASE}-router")
    assert (
        router_pdb["spec"]["minAvailable"]
        < one(objects, "Deployment", f"{RELEASE}-router")["spec"]["replicas"]
    )


def _router_config(objects) -> RouterConfig:
    cm = one(objects, "ConfigMap", f"{RELEASE}-router")
    return RouterConfig.model_validate_json(cm["data"]["router.json"])


def test_router_config_is_a_valid_router_config_listening_on_the_container_port(render):
    objects = render(SCENARIOS[0])
    config = _router_config(objects)
    assert config.host == "0.0.0.0"
    container = one(objects, "Deployment", f"{RELEASE}-router")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == config.port
    assert container["args"][:2] == ["router", "--config=/etc/tusk/router.json"]


def test_router_config_stays_valid_with_the_managed_tier(render):
    """The router does not read the tier (workers report its contents as KV events), so the
    tier changes nothing in the router's config, which must still validate."""
    objects = render(SCENARIOS[1])
    one(objects, "Service", f"{RELEASE}-kv")
    assert _router_config(objects) == _router_config(render(SCENARIOS[0]))


def test_router_config_values_are_merged_and_checked(render, tools):
    objects = render(
        SCENARIOS[0], "--set", "router.config.routing.policy=least_request", "--set", "router.port=9000"
    )
    config = _router_config(objects)
    assert (config.routing.policy, config.port) == ("least_request", 9000)
    # A key RouterConfig does not know renders, but the router would refuse it: the test catches that.
    objects = render(SCENARIOS[0], "--set", "router.config.no_such_setting=1")
    with pytest.raises(ValueError, match="no_such_setting"):
        _router_config(objects)


def test_router_pods_roll_when_config_changes(render):
    def checksum(*extra):
        dep = one(render(SCENARIOS[0], *extra), "Deployment", f"{RELEASE}-router")
        return dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() != checksum("--set", "router.config.max_queue=7")


def test_managed_tier_runs_valkey_with_the_tier_server_args(render):
    objects = render(SCENARIOS[1])
    container = one(objects, "Deployment", f"{RELEASE}-kv")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["valkey-server"]
    expected = server_args(maxmemory="512mb", policy="allkeys-lru", port=6379)
    assert container["args"][: len(expected)] == expected
    assert container["args"][len(expected) :] == ["--dir", "/data"]
    requests = container["resources"]["requests"]["memory"]
    assert requests == container["resources"]["limits"]["memory"], "tier memory must be reserved, not burst"


def test_no_tier_objects_unless_managed(render):
    objects = render(SCENARIOS[0])
    assert not [o for o in objects if o["metadata"]["name"] == f"{RELEASE}-kv"]


def test_ingress_routes_to_the_router_service(render):
    objects = render(SCENARIOS[2])
    ingress = one(objects, "Ingress", f"{RELEASE}-router")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-router", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-example-tls"
    assert not by_kind(render(SCENARIOS[0]), "Ingress")


def _operator_args(render, scenario):
    dep = one(render(scenario), "Deployment", f"{RELEASE}-operator")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "operator"
    # The operator's own parser must accept what the chart passes.
    return container, build_parser().parse_args(container["args"][1:])


def test_operator_mode_flags_are_accepted_by_the_operator(render):
    _, cluster_wide = _operator_args(render, SCENARIOS[0])
    assert cluster_wide.all_namespaces and not cluster_wide.namespace
    _, namespaced = _operator_args(render, SCENARIOS[3])
    assert not namespaced.all_namespaces and namespaced.namespace == ["team-a", "team-b"]


def test_operator_knows_the_worker_image_router_url_and_elects_a_leader(render):
    _, args = _operator_args(render, SCENARIOS[0])
    # A template: the operator fills in the flavor (cpu, cuda, rocm, xpu) from each accelerator.
    assert args.worker_image == "ghcr.io/tusk-dev/tusk-worker-{flavor}:0.1.0"
    assert args.router_url == f"http://{RELEASE}-router.{NAMESPACE}.svc:80/v1"
    assert args.image_pull_policy == "IfNotPresent" and args.leader_elect and not args.standalone
    # Leader election replaces kopf peering: no peering name, no peering objects.
    assert args.peering_name is None
    for scenario in (SCENARIOS[0], SCENARIOS[3]):
        assert not [o for o in render(scenario) if o["apiVersion"].startswith("kopf.dev/")]


def test_operator_probes_use_the_health_endpoint(render):
    container, args = _operator_args(render, SCENARIOS[0])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["ports"] == [{"name": "health", "containerPort": args.health_port, "protocol": "TCP"}]


def test_servicemonitor_needs_both_the_switch_and_the_api(render):
    with_api = render(SCENARIOS[4])
    monitor = one(with_api, "ServiceMonitor", f"{RELEASE}-router")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        one(with_api, "Service", f"{RELEASE}-router")["metadata"]["labels"].items()
    )
    pods = one(with_api, "PodMonitor", f"{RELEASE}-workers")
    assert pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tusk-worker"
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # Switch on but the cluster lacks the Prometheus Operator: nothing rendered, install still works.
    without_api = render(Scenario("servicemonitor-no-api", ("servicemonitor.yaml",)))
    assert not [o for o in without_api if o["apiVersion"].startswith("monitoring.coreos.com")]
    # API present but switch off: nothing either.
    assert not [o for o in render(Scenario("api-only", (), (MONITORING_API,))) if "Monitor" in o["kind"]]


def test_namespaced_pod_monitor_watches_only_the_operator_namespaces(render):
    pods = one(render(SCENARIOS[5]), "PodMonitor", f"{RELEASE}-workers")
    assert pods["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_dashboard_configmap_holds_valid_grafana_json(render):
    cm = one(render(SCENARIOS[0]), "ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["tusk.json"])
    assert dashboard["uid"] == "tusk-overview"
    assert len([p for p in dashboard["panels"] if p["type"] != "row"]) >= 10


def test_helm_test_hook_sends_a_chat_completion(render):
    pod = one(render(SCENARIOS[0]), "Pod", f"{RELEASE}-test-chat")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BASE_URL"] == f"http://{RELEASE}-router.{NAMESPACE}.svc:80/v1"
    assert (env["MODEL"], env["MAX_TOKENS"]) == ("", "8")
    assert re.fullmatch(r"docker\.io/curlimages/curl:\d+\.\d+\.\d+", container["image"])
    assert pod["spec"]["restartPolicy"] == "Never"


def test_notes_say_how_to_reach_the_router_and_apply_a_model(tools):
    # `helm install --dry-run=client` renders NOTES.txt without a cluster.
    for scenario, expected in (
        (SCENARIOS[0], "port-forward svc/tusk-router"),
        (SCENARIOS[2], "https://llm.example.com/v1"),
    ):
        args = ["install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE]
        for name in scenario.values:
            args += ["--values", str(VALUES_DIR / name)]
        out = tools.run(tools.helm, *args).stdout
        notes = out.split("NOTES:", 1)[1]
        assert expected in notes
        assert (
            "kind: ModelDeployment" in notes
            and "kubectl -n tusk-system wait --for=condition=Ready md/tiny" in notes
        )


def test_crds_are_installed_from_the_crds_folder(render):
    crds = by_kind(render(SCENARIOS[0], "--include-crds"), "CustomResourceDefinition")
    names = {c["metadata"]["name"] for c in crds}
    assert "modeldeployments.tusk.dev" in names
    assert not by_kind(render(SCENARIOS[0]), "CustomResourceDefinition"), (
        "CRDs must not be templates (helm keeps them)"
    )


def _router_container(objects):
    return one(objects, "Deployment", f"{RELEASE}-router")["spec"]["template"]["spec"]["containers"][0]


def test_router_args_are_accepted_by_the_router_and_enable_discovery(render, tmp_path):
    from tusk.router.app import _parse_args, load_config

    container = _router_container(render(SCENARIOS[0]))
    assert container["args"][0] == "router"
    args = _parse_args(container["args"][1:])
    assert args.kubernetes and args.namespace is None
    assert str(args.config) == "/etc/tusk/router.json"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == str(args.config.parent)
    namespaced = _parse_args(_router_container(render(SCENARIOS[3]))["args"][1:])
    assert namespaced.namespace == "team-a"
    # The router loads the rendered ConfigMap through its own loader, as in the pod.
    (tmp_path / "router.json").write_text(
        one(render(SCENARIOS[0]), "ConfigMap", f"{RELEASE}-router")["data"]["router.json"]
    )
    args.config = tmp_path / "router.json"
    assert load_config(args).port == container["ports"][0]["containerPort"]


def test_router_probes_do_not_tie_the_gateway_to_one_model(render):
    container = _router_container(render(SCENARIOS[0]))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health/live", "port": "http"}


def test_router_grace_period_covers_the_drain(render):
    dep = one(
        render(SCENARIOS[0], "--set", "router.drainTimeoutSeconds=45"), "Deployment", f"{RELEASE}-router"
    )
    assert "--drain-timeout=45" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 45 + 5  # + preStop sleep


def test_api_keys_secret_reaches_the_router_and_the_helm_test(render):
    objects = render(SCENARIOS[0], "--set", "router.apiKeys.existingSecret=router-keys")
    dep = one(objects, "Deployment", f"{RELEASE}-router")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert env["TUSK_API_KEYS_FILE"] == f"{mount['mountPath']}/api-keys"
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "router-keys"
    test_pod = one(objects, "Pod", f"{RELEASE}-test-chat")
    assert test_pod["spec"]["volumes"][0]["secret"]["secretName"] == "router-keys"
    assert "Authorization: Bearer" in test_pod["spec"]["containers"][0]["args"][0]
    assert "TUSK_API_KEYS_FILE" not in {e["name"] for e in _router_container(render(SCENARIOS[0]))["env"]}


def test_image_pull_secrets_reach_every_chart_pod(render):
    objects = render(SCENARIOS[1], "--set", "imagePullSecrets[0].name=registry")
    for name, spec in pod_specs(objects):
        if not name.startswith("Pod/"):  # the helm test pulls a public curl image
            assert spec["imagePullSecrets"] == [{"name": "registry"}], name
    assert all("imagePullSecrets" not in spec for _, spec in pod_specs(render(SCENARIOS[1])))


def test_router_autoscaling_owns_the_replica_count(render, tools):
    objects = render(SCENARIOS[-1])
    hpa = one(objects, "HorizontalPodAutoscaler", f"{RELEASE}-router")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-router",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    # Rendered, not left out: a missing spec.replicas would drop the router to 1 on the upgrade that
    # turns the HPA on. Without a live Deployment (first install, `helm template`) it is minReplicas.
    assert one(objects, "Deployment", f"{RELEASE}-router")["spec"]["replicas"] == 2
    assert not by_kind(render(SCENARIOS[0]), "HorizontalPodAutoscaler")
    bad = ("--set", "router.autoscaling.enabled=true", "--set", "router.autoscaling.minReplicas=9")
    proc = tools.run(tools.helm, *template_args(SCENARIOS[0], *bad), check=False)
    assert proc.returncode != 0 and "must not exceed maxReplicas" in proc.stderr


def test_tier_network_policy_admits_the_router_and_operator_made_workers(render):
    from tusk.operator.desired import Owner, desired_children
    from tusk.operator.spec import parse_spec

    objects = render(SCENARIOS[1])
    policy = one(objects, "NetworkPolicy", f"{RELEASE}-kv")
    tier_labels = one(objects, "Deployment", f"{RELEASE}-kv")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= tier_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"] == {}
    allowed = peer["podSelector"]["matchLabels"]
    router_labels = one(objects, "Deployment", f"{RELEASE}-router")["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= router_labels.items()
    children = desired_children(Owner("tiny", "team-a", "uid-1"), parse_spec({"model": {"source": "tiny"}}))
    workers = [
        c
        for c in children
        if c["kind"] == "Deployment" and "tusk-worker" in str(c["spec"]["template"]["metadata"]["labels"])
    ]
    assert workers
    for worker in workers:
        assert allowed.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert not by_kind(render(SCENARIOS[1], "--set", "kvTier.networkPolicy.enabled=false"), "NetworkPolicy")


def test_packaged_chart_renders_like_the_folder(tools, render, tmp_path):
    """`helm package` keeps files/ and crds/ (the generated RBAC and dashboard live there)."""
    tools.run(tools.helm, "package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("tusk-*.tgz")
    args = template_args(SCENARIOS[1], "--include-crds")
    args[args.index(str(CHART))] = str(archive)
    packaged = [o for o in yaml.safe_load_all(tools.run(tools.helm, *args).stdout) if o]
    assert packaged == render(SCENARIOS[1], "--include-crds")


def _notes(tools, *args: str) -> str:
    out = tools.run(
        tools.helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE, *args
    ).stdout
    return out.split("NOTES:", 1)[1]


def test_notes_put_the_first_model_where_operator_and_router_both_look(tools):
    notes = _notes(tools, "--values", str(VALUES_DIR / "namespaced.yaml"))
    assert "kubectl apply -n team-a -f -" in notes and "kubectl -n team-a wait" in notes
    assert "WARNING" not in notes
    mismatch = _notes(
        tools,
        "--values",
        str(VALUES_DIR / "namespaced.yaml"),
        "--set",
        "router.discovery.namespace=elsewhere",
    )
    assert "WARNING: the router discovers workers only in elsewhere" in mismatch
    no_api = _notes(tools, "--values", str(VALUES_DIR / "servicemonitor.yaml"))
    assert "does not serve\nmonitoring.coreos.com/v1" in no_api


def test_shared_tier_uses_the_operators_valkey_image(render):
    from tusk.operator.spec import ManagedTier

    container = one(render(SCENARIOS[1]), "Deployment", f"{RELEASE}-kv")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["image"].removeprefix("docker.io/") == ManagedTier().image

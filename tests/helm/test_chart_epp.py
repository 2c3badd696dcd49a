"""The chart's endpoint picker (``epp.enabled``): off by default; when on, a valid, locked-down
``tusk epp`` Deployment whose config the picker accepts, behind the Service the operator's
InferencePools name."""

from __future__ import annotations

import importlib.util

import kubernetes_validate
import pytest
from chartkit import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    SCENARIOS,
    VALUES_DIR,
    Scenario,
    one,
    template_args,
)
from tusk.operator import inference_pool
from tusk.operator.desired import Owner
from tusk.router.epp.main import _parse_args, load_config

from tusk.config import EndpointPickerConfig

EPP = Scenario("epp", ("epp.yaml",))
EPP_PODS = Scenario("epp-pods", ("epp-pods.yaml",))
NAME = f"{RELEASE}-epp"


def _restricted_violations():
    path = REPO_ROOT / "tests" / "operator" / "pod_security.py"
    spec = importlib.util.spec_from_file_location("tusk_test_pod_security", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.restricted_violations


def _operator_env(objects, fullname: str = RELEASE) -> dict[str, str]:
    container = one(objects, "Deployment", f"{fullname}-operator")["spec"]["template"]["spec"]["containers"][
        0
    ]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_off_by_default(render):
    objects = render(SCENARIOS[0])
    assert not [o for o in objects if o["metadata"]["name"] == NAME]
    assert inference_pool.PICKER_SERVICE_ENV not in _operator_env(objects)


@pytest.mark.parametrize("scenario", [EPP, EPP_PODS], ids=["static", "pods"])
def test_picker_objects_are_valid_and_restricted(render, scenario: Scenario):
    objects = [o for o in render(scenario) if o["metadata"]["name"] == NAME]
    watches = scenario is EPP_PODS
    rbac = ["Role", "RoleBinding"] if watches else []
    assert sorted(o["kind"] for o in objects) == sorted(
        ["ConfigMap", "Deployment", "Service", "ServiceAccount", *rbac]
    )
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    deployment = one(objects, "Deployment", NAME)
    template = deployment["spec"]["template"]
    assert _restricted_violations()(template) == []
    pod = template["spec"]
    # With static servers tusk epp calls no Kubernetes API: no token and no Role. With selectors it
    # lists and watches pods in its own namespace, and nothing else.
    assert pod["automountServiceAccountToken"] is watches and pod["serviceAccountName"] == NAME
    assert one(objects, "ServiceAccount", NAME)["automountServiceAccountToken"] is watches
    if watches:
        role = one(objects, "Role", NAME)
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
        binding = one(objects, "RoleBinding", NAME)
        assert binding["roleRef"]["name"] == NAME
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    service = one(objects, "Service", NAME)
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert container["livenessProbe"]["grpc"] == {"port": ports["grpc-ext-proc"], "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc-ext-proc"], "service": "readiness"}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/tusk", "/tokenizers"} <= mounts


def test_picker_config_is_what_tusk_epp_loads(render, tmp_path):
    objects = render(EPP)
    data = one(objects, "ConfigMap", NAME)["data"]["epp.json"]
    config = EndpointPickerConfig.model_validate_json(data)
    container = one(objects, "Deployment", NAME)["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.host == "0.0.0.0" and config.port == ports["grpc-ext-proc"]
    assert config.metrics_port == ports["metrics"]
    assert config.fallbacks == 1 and config.shed_queue_depth == 64
    assert [w.address for w in config.models[0].workers] == ["10.0.0.5:8000", "10.0.0.6:8000"]
    # The container's arguments, as `tusk epp` parses them, load the mounted file.
    (tmp_path / "epp.json").write_text(data)
    args = [a.replace("/etc/tusk", str(tmp_path)) for a in container["args"][1:]]
    assert container["args"][0] == "epp"
    assert load_config(_parse_args(args)) == config


def test_selector_routes_select_what_the_operators_pools_select(render):
    """The documented selector is the operator's pool selector: the picker serves the pool's pods."""
    data = one(render(EPP_PODS), "ConfigMap", NAME)["data"]["epp.json"]
    config = EndpointPickerConfig.model_validate_json(data)
    for route in config.models:
        wanted = inference_pool.pool_selector(Owner(route.name, NAMESPACE, "u"))
        assert dict(part.split("=", 1) for part in route.kubernetes_selector.split(",")) == wanted


def test_inference_pools_name_the_pickers_service(render):
    """The operator gets the Service's name, and the pools it builds point at that Service's port."""
    objects = render(EPP, "--set", "fullnameOverride=gw")
    service = one(objects, "Service", "gw-epp")
    env = _operator_env(objects, "gw")
    assert env[inference_pool.PICKER_SERVICE_ENV] == "gw-epp"
    ext_proc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    pool = inference_pool.inference_pool(Owner("chat", "models", "u"), env[inference_pool.PICKER_SERVICE_ENV])
    assert pool["spec"]["endpointPickerRef"]["name"] == "gw-epp"
    assert pool["spec"]["endpointPickerRef"]["port"] == {"number": ext_proc}
    # With the default release name, the operator's default already names the chart's picker.
    assert inference_pool.DEFAULT_PICKER_SERVICE == NAME


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("epp.enabled=true", "epp.config.models"),
        ("epp.replicass=2", "additional properties"),
        ("epp.port=0", "port"),
    ],
)
def test_bad_picker_values_fail_with_a_message(tools, setting: str, message: str):
    proc = tools.run(tools.helm, *template_args(SCENARIOS[0], "--set", setting), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_helm_v3_and_v4_lint_the_picker_strictly(tools):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    args += ["--values", str(VALUES_DIR / "epp.yaml")]
    for helm in (tools.helm, tools.helm3):
        assert "0 chart(s) failed" in tools.run(helm, *args).stdout

"""Desired-state builders over many specs; every object must pass kubernetes-validate --strict."""

from __future__ import annotations

import itertools
import json

import kubernetes_validate
import pytest
from pod_security import restricted_violations
from tusk.operator import desired
from tusk.operator.apply import drift_patch, is_subset
from tusk.operator.desired import Defaults, Owner, desired_children
from tusk.operator.spec import InvalidSpec, parse_spec

from tusk.config import WorkerConfig

K8S_VERSION = "1.33"
OWNER = Owner("llama", "models", "0b0e4a4c-2a9f-4d55-9a49-3d2b51b0c2de", generation=3)

SOURCES = [
    {"source": "tiny"},
    {
        "source": "hf://meta-llama/Llama-3.1-8B-Instruct@main",
        "tokenSecretRef": {"name": "hf"},
        "cache": {"sizeLimit": "40Gi", "persistentVolumeClaim": "model-cache"},
    },
    {"source": "pvc://models/llama/8b"},
    {"source": "image://registry.example/models/llama:8b", "imagePath": "/weights"},
    {"source": "/opt/models/llama"},
]
ROLES = [
    {},
    {
        "replicas": 3,
        "accelerator": "nvidia",
        "acceleratorsPerReplica": 1,
        "resources": {"limits": {"memory": "64Gi"}},
        "imagePullSecrets": [{"name": "registry"}],
        "serviceAccountName": "llm",
        "priorityClassName": "inference",
        "runtimeClassName": "nvidia",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"tusk.dev/model": "llama"}},
            }
        ],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        "rollout": {"maxSurge": 1, "maxUnavailable": 0},
    },
    {
        "replicas": 1,
        "accelerator": "amd",
        "nodeSelector": {"pool": "mi300"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"tusk.dev/model": "llama"}},
                        },
                    }
                ]
            }
        },
        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
        "image": "tusk:dev",
        "podTemplate": {
            "metadata": {"annotations": {"team": "llm"}},
            "spec": {"containers": [{"name": "worker", "env": [{"name": "EXTRA", "value": "1"}]}]},
        },
    },
    {"replicas": 2, "accelerator": "intel", "resources": {"requests": {"cpu": "4", "memory": "16Gi"}}},
]
TIERS = [
    None,
    {},
    {"managed": {"replicas": 1, "memory": "4Gi", "maxmemoryPolicy": "allkeys-lfu"}},
    {"managed": {"replicas": 0}},
    {"external": {"url": "rediss://cache.example:6380/2", "secretRef": {"name": "redis"}}},
]


def _specs():
    for source, prefill, decode, tier in itertools.product(SOURCES, ROLES, ROLES[:3], TIERS):
        spec = {"model": source, "prefill": dict(prefill), "decode": {"replicas": 1, **decode}}
        if tier is not None:
            spec["kvTier"] = tier
        yield spec


# Every third combination: each source, role shape and tier still appears many times.
ALL_SPECS = list(_specs())[::3]


def test_many_specs_produce_valid_objects() -> None:
    assert len(ALL_SPECS) >= 100
    seen_kinds = set()
    for raw in ALL_SPECS:
        spec = parse_spec(raw)
        children = desired_children(OWNER, spec, Defaults(worker_image="tusk:0.1"))
        names = [(c["kind"], c["metadata"]["name"]) for c in children]
        assert len(names) == len(set(names))
        for child in children:
            seen_kinds.add(child["kind"])
            kubernetes_validate.validate(child, K8S_VERSION, strict=True)
            if child["kind"] == "Deployment":
                assert restricted_violations(child["spec"]["template"]) == [], (
                    raw,
                    child["metadata"]["name"],
                )
            meta = child["metadata"]
            assert meta["namespace"] == "models"
            assert meta["ownerReferences"] == [OWNER.reference()]
            for label in (
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
            ):
                assert label in meta["labels"], (child["kind"], label)
            assert meta["labels"]["tusk.dev/model"] == "llama"
            assert "tusk.dev/role" in meta["labels"]
    assert seen_kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Secret",
        "NetworkPolicy",
    }


def test_validator_rejects_unknown_fields() -> None:
    bad = desired_children(OWNER, parse_spec({"model": {"source": "tiny"}}))[0] | {"bogus": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _by_name(children):
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def _config_of(objs, deployment) -> dict[str, str]:
    """The data of the ConfigMap a worker Deployment mounts (named by its content)."""
    (name,) = [
        v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v
    ]
    return objs["ConfigMap", name]["data"]


def test_worker_pods_follow_the_label_contract_and_config() -> None:
    spec = parse_spec(
        {"model": {"source": "hf://org/m"}, "servedModelNames": ["chat", "m"], "prefill": {"replicas": 2}}
    )
    objs = _by_name(desired_children(OWNER, spec))
    for role in ("prefill", "decode"):
        deployment = objs["Deployment", f"llama-{role}"]
        template = deployment["spec"]["template"]
        config = _config_of(objs, deployment)
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "tusk-worker"
        assert labels["tusk.dev/role"] == role
        assert template["metadata"]["annotations"]["tusk.dev/served-model-names"] == "chat,m"
        container = template["spec"]["containers"][0]
        assert container["command"] == ["tusk", "worker", "--config", "/etc/tusk/worker.json"]
        http = {"http": 8000} if role == "decode" else {}  # decode workers serve OpenAI HTTP
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "grpc": 50051,
            "metrics": 9090,
            **http,
        }
        # The Deployment selector is a subset of the pod labels and never includes the role.
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert "tusk.dev/role" not in deployment["spec"]["selector"]["matchLabels"]
        worker = WorkerConfig.model_validate_json(config["worker.json"])
        assert worker.role.value == role and worker.port == 50051 and worker.served_model_name == "chat"
        assert worker.http_port == (8000 if role == "decode" else None)
        assert worker.kv_tier.url == "redis://llama-kv.models.svc:6379/0"
        service = objs["Service", f"llama-{role}"]
        assert service["spec"]["clusterIP"] == "None"
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "metrics"]


def test_no_prefill_workers_means_decode_pods_do_both() -> None:
    objs = _by_name(desired_children(OWNER, parse_spec({"model": {"source": "tiny"}})))
    decode = objs["Deployment", "llama-decode"]
    assert decode["spec"]["template"]["metadata"]["labels"]["tusk.dev/role"] == "both"
    assert objs["Deployment", "llama-prefill"]["spec"]["replicas"] == 0
    assert json.loads(_config_of(objs, decode)["worker.json"])["role"] == "both"


def test_managed_tier_uses_shared_server_args() -> None:
    from tusk.kvserver import server_args

    spec = parse_spec(
        {
            "model": {"source": "tiny"},
            "kvTier": {"managed": {"memory": "1Gi", "maxmemoryPolicy": "allkeys-lfu"}},
        }
    )
    objs = _by_name(desired_children(OWNER, spec))
    kv = objs["Deployment", "llama-kv"]
    container = kv["spec"]["template"]["spec"]["containers"][0]
    # valkey-server itself, as the image's non-root user: the entrypoint's root-to-valkey switch is
    # never needed, and the password comes from the generated Secret.
    assert container["command"] == ["valkey-server"]
    assert container["args"] == [
        *server_args(str(int(1024**3 * 0.8)), "allkeys-lfu", 6379),
        "--requirepass",
        "$(TUSK_KV_TIER_PASSWORD)",
    ]
    assert container["env"] == [
        {
            "name": "TUSK_KV_TIER_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "llama-kv-auth", "key": "password"}},
        }
    ]
    pod_sc = kv["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsUser"] == 999 and pod_sc["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert kv["spec"]["strategy"]["type"] == "Recreate"
    secret = objs["Secret", "llama-kv-auth"]
    assert "data" not in secret and "stringData" not in secret  # filled once, at creation, by apply
    assert secret["metadata"]["annotations"]["tusk.dev/generated-keys"] == "password"
    # Workers authenticate with it, through the environment only.
    env = {
        e["name"]: e
        for e in objs["Deployment", "llama-decode"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TUSK_KV_TIER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "llama-kv-auth",
        "key": "password",
    }
    assert env["TUSK_KV_TIER_URL"]["value"] == "redis://:$(TUSK_KV_TIER_PASSWORD)@llama-kv.models.svc:6379/0"
    # Only this model's workers and the router may connect.
    policy = objs["NetworkPolicy", "llama-kv"]["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items() <= kv["spec"]["template"]["metadata"]["labels"].items()
    )
    (rule,) = policy["ingress"]
    workers, router = rule["from"]
    worker_labels = objs["Deployment", "llama-decode"]["spec"]["template"]["metadata"]["labels"]
    assert workers["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert "namespaceSelector" not in workers
    assert router["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "tusk-router"
    other = _by_name(desired_children(Owner("other", "models", "u2"), spec))
    other_labels = other["Deployment", "other-decode"]["spec"]["template"]["metadata"]["labels"]
    assert not workers["podSelector"]["matchLabels"].items() <= other_labels.items()


def test_external_tier_password_comes_from_secret_not_config() -> None:
    spec = parse_spec(
        {
            "model": {"source": "tiny"},
            "kvTier": {"external": {"url": "redis://cache:6379/0", "secretRef": {"name": "r"}}},
        }
    )
    objs = _by_name(desired_children(OWNER, spec))
    assert ("Deployment", "llama-kv") not in objs
    decode = objs["Deployment", "llama-decode"]
    env = decode["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["TUSK_KV_TIER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "r", "key": "password"}
    assert by_name["TUSK_KV_TIER_URL"]["value"] == "redis://:$(TUSK_KV_TIER_PASSWORD)@cache:6379/0"
    assert "password" not in _config_of(objs, decode)["worker.json"].lower().replace("_password", "")


def test_accelerators_map_to_resources_tolerations_images_and_devices() -> None:
    defaults = Defaults()  # the shipped template: ghcr.io/tusk-dev/tusk-worker-{flavor}:0.1.0
    for accelerator, resource, flavor, device in (
        ("nvidia", "nvidia.com/gpu", "cuda", "cuda"),
        ("amd", "amd.com/gpu", "rocm", "cuda"),
        ("intel", "gpu.intel.com/i915", "xpu", "xpu"),
        ("cpu", None, "cpu", "cpu"),
    ):
        spec = parse_spec(
            {"model": {"source": "tiny"}, "decode": {"replicas": 1, "accelerator": accelerator}}
        )
        objs = _by_name(desired_children(OWNER, spec, defaults))
        deployment = objs["Deployment", "llama-decode"]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        # The resource request schedules the pod; no provider-specific node label is required.
        assert "nodeSelector" not in pod
        assert container["image"] == f"ghcr.io/tusk-dev/tusk-worker-{flavor}:0.1.0"
        assert json.loads(_config_of(objs, deployment)["worker.json"])["engine"]["device"] == device
        if resource is None:
            assert "resources" not in container and "tolerations" not in pod
        else:
            assert container["resources"]["limits"][resource] == 1
            assert any(t["key"] == resource for t in pod["tolerations"])
    # A template without {flavor} is used as is; a spec image wins over the template.
    spec = parse_spec({"model": {"source": "tiny"}, "decode": {"accelerator": "nvidia"}})
    pod = _by_name(desired_children(OWNER, spec, Defaults(worker_image="mine:1")))[
        "Deployment", "llama-decode"
    ]
    assert pod["spec"]["template"]["spec"]["containers"][0]["image"] == "mine:1"
    spec = parse_spec({"model": {"source": "tiny"}, "image": "pinned:2", "decode": {"accelerator": "nvidia"}})
    pod = _by_name(desired_children(OWNER, spec))["Deployment", "llama-decode"]
    assert pod["spec"]["template"]["spec"]["containers"][0]["image"] == "pinned:2"


def _config_name(objs, role: str = "decode") -> str:
    volumes = objs["Deployment", f"llama-{role}"]["spec"]["template"]["spec"]["volumes"]
    return next(v["configMap"]["name"] for v in volumes if "configMap" in v)


def test_model_change_is_a_new_configmap_and_rolls_without_a_spare_gpu() -> None:
    a = _by_name(desired_children(OWNER, parse_spec({"model": {"source": "hf://org/m@v1"}})))
    b = _by_name(desired_children(OWNER, parse_spec({"model": {"source": "hf://org/m@v2"}})))
    key = ("Deployment", "llama-decode")
    # A new config is a new, immutable ConfigMap: old pods restarting mid-rollout keep theirs.
    assert _config_name(a) != _config_name(b)
    assert ("ConfigMap", _config_name(a)) not in b
    assert b["ConfigMap", _config_name(b)]["immutable"] is True
    assert b[key]["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    surge = parse_spec(
        {"model": {"source": "tiny"}, "decode": {"rollout": {"maxSurge": "25%", "maxUnavailable": 0}}}
    )
    deployment = _by_name(desired_children(OWNER, surge))[key]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}


def test_routing_change_does_not_touch_worker_pods() -> None:
    """spec.routing is the router's (it reads the ModelDeployment): GPU workers must not restart."""
    a = desired_children(OWNER, parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": 1}}))
    b = desired_children(
        OWNER,
        parse_spec(
            {
                "model": {"source": "tiny"},
                "prefill": {"replicas": 1},
                "routing": {"policy": "round_robin", "disaggregationThreshold": 7},
            }
        ),
    )
    assert a == b
    assert "round_robin" not in json.dumps(b)


def test_a_prefill_change_does_not_restart_decode_workers() -> None:
    a = _by_name(
        desired_children(OWNER, parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": 1}}))
    )
    b = _by_name(
        desired_children(
            OWNER,
            parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": 1, "accelerator": "nvidia"}}),
        )
    )
    key = ("Deployment", "llama-decode")
    assert a[key]["spec"]["template"] == b[key]["spec"]["template"]
    assert _config_name(a, "prefill") != _config_name(b, "prefill")


def test_model_sources_resolve_inside_the_container() -> None:
    cases = {
        "tiny": "tiny",
        "hf://org/m": "hf://org/m",
        "pvc://weights/llama/8b": "/models/llama/8b",
        "pvc://weights": "/models",
        "image://reg/m:1": "/models",
        "/opt/m": "/opt/m",
    }
    for source, path in cases.items():
        assert desired.model_path(parse_spec({"model": {"source": source}})) == path


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"source": "ftp://x"}}, "spec.model.source: 'ftp://x' is not valid"),
        ({"model": {"source": "tiny"}, "decode": {"replicas": -1}}, "decode.replicas must be at least 0"),
        (
            {"model": {"source": "tiny"}, "decode": {"acceleratorsPerReplica": 2}},
            "tensor parallelism is not supported yet",
        ),
        ({"model": {"source": "tiny"}, "prefill": {"replicas": -1}}, "prefill.replicas must be at least 0"),
        (
            {"model": {"source": "tiny"}, "kvTier": {"managed": {}, "external": {"url": "redis://x:1"}}},
            "either external (url) or managed, not both",
        ),
        ({"model": {"source": "tiny", "tokenSecretRef": {"name": "x"}}}, "only used with hf://"),
        ({"model": {"source": "tiny"}, "decode": {"accelerator": "tpu"}}, "spec.decode.accelerator"),
        ({}, "spec.model: Field required"),
    ],
)
def test_invalid_specs_have_readable_reasons(raw, message) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(raw)
    assert message in str(info.value)


def test_drift_detection_ignores_server_defaults_and_repairs_changes() -> None:
    spec = parse_spec({"model": {"source": "tiny"}, "decode": {"replicas": 1, "nodeSelector": {"a": "b"}}})
    deployment = _by_name(desired_children(OWNER, spec))["Deployment", "llama-decode"]
    live = json.loads(json.dumps(deployment))
    live["status"] = {"replicas": 1}
    live["metadata"]["labels"]["added-by-someone"] = "x"
    live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    # `kubectl rollout restart` stamps the pod template; keeping it avoids a second rollout.
    live["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "now"
    assert is_subset(deployment, live)
    assert drift_patch(deployment, live) is None

    live["spec"]["template"]["spec"]["nodeSelector"]["evil"] = "1"
    patch = drift_patch(deployment, live)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"a": "b", "evil": None}

    unpinned = parse_spec({"model": {"source": "tiny"}})
    patch = drift_patch(_by_name(desired_children(OWNER, unpinned))["Deployment", "llama-decode"], live)
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None
    # Quantities come back from the server as strings.
    assert is_subset({"limits": {"nvidia.com/gpu": 1}}, {"limits": {"nvidia.com/gpu": "1"}})


def test_fields_a_pod_template_stops_setting_are_removed() -> None:
    """Like kubectl apply's last-applied: what the operator wrote and no longer writes goes."""
    with_override = parse_spec(
        {
            "model": {"source": "tiny"},
            "decode": {
                "podTemplate": {
                    "spec": {
                        "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["hub"]}],
                        "enableServiceLinks": None,
                    }
                }
            },
        }
    )
    first = _by_name(desired_children(OWNER, with_override))["Deployment", "llama-decode"]
    live = json.loads(json.dumps(first))
    live["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"  # a server default, never ours
    assert drift_patch(first, live) is None

    plain = _by_name(desired_children(OWNER, parse_spec({"model": {"source": "tiny"}})))[
        "Deployment", "llama-decode"
    ]
    patch = drift_patch(plain, live)
    pod_patch = patch["spec"]["template"]["spec"]
    assert pod_patch["hostAliases"] is None  # added by the override, now gone
    assert pod_patch["enableServiceLinks"] is False  # removed by the override, back
    assert "dnsPolicy" not in pod_patch
    assert "hostAliases" not in plain["spec"]["template"]["spec"]  # the desired object is untouched

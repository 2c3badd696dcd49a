"""Desired state: a ModelDeployment spec in, the Kubernetes objects that serve it out.

Pure functions with no API calls, so every spec can be checked offline (schema-validated in the
tests) and the handlers only diff and apply. Each child is fully described here, including its
labels and ownerReference, which is what makes create-or-patch idempotent and drift repair exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from tusk.operator import schema
from tusk.operator.spec import ModelDeploymentSpec, RoleSpec

from tusk.config import EngineConfig, KVTierConfig, ModelRoute, Role, RoutingConfig, WorkerConfig
from tusk.kvserver import server_args

GRPC_PORT = 50051
METRICS_PORT = 9090
KV_PORT = 6379
CONFIG_MOUNT = "/etc/tusk"
MODELS_MOUNT = "/models"
CACHE_MOUNT = "/var/cache/tusk"
DEFAULT_WORKER_IMAGE = "ghcr.io/tusk-dev/tusk:0.1.0"
CONFIG_HASH_ANNOTATION = "tusk.dev/config-hash"
SERVED_NAMES_ANNOTATION = "tusk.dev/served-model-names"
# The router serving many models in a cluster learns each one's routing from its worker pods.
ROUTING_ANNOTATION = "tusk.dev/routing"
KV_PASSWORD_ENV = "TUSK_KV_TIER_PASSWORD"
KV_URL_ENV = "TUSK_KV_TIER_URL"

# accelerator -> (device resource name, node selector that marks nodes with that device, taint key)
ACCELERATOR_RESOURCES: dict[str, tuple[str, dict[str, str], str] | None] = {
    "nvidia": ("nvidia.com/gpu", {"nvidia.com/gpu.present": "true"}, "nvidia.com/gpu"),
    "amd": ("amd.com/gpu", {"feature.node.kubernetes.io/amd-gpu": "true"}, "amd.com/gpu"),
    "intel": ("gpu.intel.com/i915", {"intel.feature.node.kubernetes.io/gpu": "true"}, "gpu.intel.com/i915"),
    "cpu": None,
}
WORKER_ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the children belong to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{schema.GROUP}/{schema.VERSION}",
            "kind": schema.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings (command-line flags) that fill what a spec leaves open."""

    worker_image: str = DEFAULT_WORKER_IMAGE
    router_url: str | None = None
    image_pull_policy: str = "IfNotPresent"
    extra_labels: dict[str, str] = field(default_factory=dict)


def child_name(owner: str, component: str) -> str:
    return f"{owner}-{component}"


def served_model_names(owner: Owner, spec: ModelDeploymentSpec) -> list[str]:
    return list(spec.served_model_names) or [owner.name]


def pod_role(spec: ModelDeploymentSpec, role: str) -> Role:
    """Decode workers prefill for themselves when the deployment has no prefill workers."""
    if role == "decode" and spec.prefill.replicas == 0:
        return Role.BOTH
    return Role(role)


def selector_labels(owner: Owner, component: str) -> dict[str, str]:
    """Immutable Deployment selectors: only labels that never change for the child's lifetime."""
    return {"tusk.dev/model": owner.name, "app.kubernetes.io/component": component}


def selector_string(owner: Owner, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(owner, component).items()))


def labels(owner: Owner, component: str, role: str, app_name: str, defaults: Defaults) -> dict[str, str]:
    return {
        **defaults.extra_labels,
        "app.kubernetes.io/part-of": "tusk",
        "app.kubernetes.io/name": app_name,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": "tusk-operator",
        "app.kubernetes.io/component": component,
        "tusk.dev/model": owner.name,
        "tusk.dev/role": role,
    }


def _metadata(owner: Owner, name: str, object_labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": object_labels,
        "ownerReferences": [owner.reference()],
        **extra,
    }


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- KV tier -------------------------------------------------------------------------------------


def kv_tier_url(owner: Owner, spec: ModelDeploymentSpec) -> str | None:
    """The URL workers use, without any password (that comes from a Secret via the environment)."""
    if spec.kv_tier.external is not None:
        return spec.kv_tier.external.url
    if spec.kv_tier.managed is not None and spec.kv_tier.managed.replicas > 0:
        return f"redis://{child_name(owner.name, 'kv')}.{owner.namespace}.svc:{KV_PORT}/0"
    return None


def maxmemory_bytes(memory: int | str) -> int:
    """80% of the container limit: the rest covers fragmentation and client buffers (no OOM kills)."""
    from kubernetes.utils import parse_quantity

    return int(parse_quantity(memory) * 8 // 10)


def kv_tier_objects(owner: Owner, spec: ModelDeploymentSpec, defaults: Defaults) -> list[dict[str, Any]]:
    managed = spec.kv_tier.managed
    if managed is None:
        return []
    name = child_name(owner.name, "kv")
    object_labels = labels(owner, "kv-tier", "kv-tier", "tusk-kv-tier", defaults)
    args = server_args(str(maxmemory_bytes(managed.memory)), managed.maxmemory_policy, KV_PORT)
    probe = {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "timeoutSeconds": 2}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, name, object_labels),
        "spec": {
            "replicas": managed.replicas,
            # One cache server: a surge pod would start empty and split writes, so replace it instead.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(owner, "kv-tier")},
            "template": {
                "metadata": {"labels": object_labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "containers": [
                        {
                            "name": "valkey",
                            "image": managed.image,
                            "imagePullPolicy": defaults.image_pull_policy,
                            "command": ["valkey-server", *args],
                            "ports": [{"name": "redis", "containerPort": KV_PORT, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": managed.memory},
                                "limits": {"memory": managed.memory},
                            },
                            "readinessProbe": probe,
                            "livenessProbe": {**probe, "initialDelaySeconds": 5},
                            "securityContext": _container_security(),
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, name, object_labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner, "kv-tier"),
            "ports": [{"name": "redis", "port": KV_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


# --- Config --------------------------------------------------------------------------------------


def model_path(spec: ModelDeploymentSpec) -> str:
    """Where the worker finds the model inside its container."""
    source = spec.model
    if source.kind == "pvc":
        _, _, sub_path = source.source[len("pvc://") :].partition("/")
        return f"{MODELS_MOUNT}/{sub_path}".rstrip("/")
    if source.kind == "image":
        return MODELS_MOUNT
    return source.source  # tiny, hf://..., or a path already in the image


def worker_config(owner: Owner, spec: ModelDeploymentSpec, role: str) -> WorkerConfig:
    engine = EngineConfig(
        dtype=spec.dtype,
        block_size=spec.block_size,
        max_model_len=spec.max_model_len,
        **{
            key: value
            for key, value in {
                "max_num_seqs": spec.engine.max_num_seqs,
                "max_num_batched_tokens": spec.engine.max_num_batched_tokens,
                "kv_cache_memory_fraction": spec.engine.kv_cache_memory_fraction,
                "kernel_backend": spec.engine.kernel_backend,
            }.items()
            if value is not None
        },
    )
    return WorkerConfig(
        model=model_path(spec),
        served_model_name=served_model_names(owner, spec)[0],
        role=pod_role(spec, role),
        host="0.0.0.0",
        port=GRPC_PORT,
        metrics_port=METRICS_PORT,
        engine=engine,
        kv_tier=KVTierConfig(url=kv_tier_url(owner, spec)),
    )


def routing_config(spec: ModelDeploymentSpec) -> RoutingConfig:
    return RoutingConfig(
        policy=spec.routing.policy, disaggregation_threshold_tokens=spec.routing.disaggregation_threshold
    )


def model_route(owner: Owner, spec: ModelDeploymentSpec) -> ModelRoute:
    """What the router needs to serve this model; workers are found by label selector."""
    return ModelRoute(
        name=served_model_names(owner, spec)[0],
        tokenizer=spec.tokenizer or model_path(spec),
        block_size=spec.block_size,
        max_model_len=spec.max_model_len,
        kubernetes_selector=f"app.kubernetes.io/name=tusk-worker,tusk.dev/model={owner.name}",
        routing=routing_config(spec),
    )


def config_data(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, str]:
    data = {
        f"{role}.json": worker_config(owner, spec, role).model_dump_json(indent=2) for role in WORKER_ROLES
    }
    data["router.json"] = model_route(owner, spec).model_dump_json(indent=2)
    data["routing.json"] = routing_config(spec).model_dump_json(indent=2)
    return data


def config_map(owner: Owner, spec: ModelDeploymentSpec, defaults: Defaults) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            owner, child_name(owner.name, "config"), labels(owner, "config", "config", "tusk", defaults)
        ),
        "data": config_data(owner, spec),
    }


# --- Workers -------------------------------------------------------------------------------------


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def worker_env(owner: Owner, spec: ModelDeploymentSpec, role_spec: RoleSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TUSK_CACHE_DIR", "value": CACHE_MOUNT},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
    ]
    token = spec.model.token_secret_ref
    if token is not None:
        env.append(_secret_env("HF_TOKEN", token.name, token.key))
    external = spec.kv_tier.external
    if external is not None and external.secret_ref is not None:
        # Kubernetes expands $(VAR) from earlier entries, so the password never lands in the ConfigMap.
        env.append(_secret_env(KV_PASSWORD_ENV, external.secret_ref.name, external.secret_ref.key))
        scheme, _, rest = external.url.partition("://")
        env.append({"name": KV_URL_ENV, "value": f"{scheme}://:$({KV_PASSWORD_ENV})@{rest}"})
    env.extend(role_spec.env)
    return env


def _resources(role_spec: RoleSpec) -> dict[str, Any]:
    limits = dict(role_spec.resources.limits)
    requests = dict(role_spec.resources.requests)
    device = ACCELERATOR_RESOURCES[role_spec.accelerator]
    if device is not None:
        limits.setdefault(device[0], role_spec.accelerators_per_replica)
    resources: dict[str, Any] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _volumes(owner: Owner, spec: ModelDeploymentSpec, role: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(volumes, worker volumeMounts, initContainers) for config, cache and the model source."""
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": child_name(owner.name, "config"),
                "items": [{"key": f"{role}.json", "path": "worker.json"}],
            },
        },
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT},
    ]
    init: list[dict[str, Any]] = []
    source = spec.model
    if source.kind == "pvc":
        claim = source.source[len("pvc://") :].partition("/")[0]
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    elif source.kind == "image":
        volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        init.append(
            {
                "name": "model",
                "image": source.source[len("image://") :],
                "command": ["sh", "-c", f'cp -a "{source.image_path.rstrip("/")}/." {MODELS_MOUNT}/'],
                "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
                "securityContext": _container_security(),
            }
        )
    return volumes, mounts, init


def worker_deployment(
    owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults, config: dict[str, str]
) -> dict[str, Any]:
    role_spec: RoleSpec = getattr(spec, role)
    pod_labels = _worker_labels(owner, spec, role, defaults)
    names = ",".join(served_model_names(owner, spec))
    volumes, mounts, init = _volumes(owner, spec, role)
    node_selector: dict[str, str] = {}
    tolerations = list(role_spec.tolerations)
    device = ACCELERATOR_RESOURCES[role_spec.accelerator]
    if device is not None:
        node_selector.update(device[1])
        tolerations.append({"key": device[2], "operator": "Exists", "effect": "NoSchedule"})
    node_selector.update(role_spec.node_selector)
    tcp = {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "worker",
        "image": role_spec.image or spec.image or defaults.worker_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["tusk", "worker", "--config", f"{CONFIG_MOUNT}/worker.json"],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": worker_env(owner, spec, role_spec),
        "volumeMounts": mounts,
        # Loading weights can take many minutes; the startup probe holds liveness off until then.
        "startupProbe": {**tcp, "failureThreshold": 180},
        "readinessProbe": tcp,
        "livenessProbe": {**tcp, "failureThreshold": 6},
        "securityContext": _container_security(),
    }
    resources = _resources(role_spec)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 45,
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        pod_spec["initContainers"] = init
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if role_spec.affinity:
        pod_spec["affinity"] = role_spec.affinity
    annotations = {
        CONFIG_HASH_ANNOTATION: config_hash(config[f"{role}.json"]),
        SERVED_NAMES_ANNOTATION: names,
        ROUTING_ANNOTATION: routing_config(spec).model_dump_json(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, child_name(owner.name, role), pod_labels),
        "spec": {
            "replicas": role_spec.replicas,
            # A new model version starts new pods before old ones stop: the model never goes offline.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1800,
            "selector": {"matchLabels": selector_labels(owner, role)},
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def _worker_labels(owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults) -> dict[str, str]:
    return labels(owner, role, pod_role(spec, role).value, "tusk-worker", defaults)


def _worker_metadata(
    owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults
) -> dict[str, Any]:
    return _metadata(owner, child_name(owner.name, role), _worker_labels(owner, spec, role, defaults))


def worker_service(owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults) -> dict[str, Any]:
    """Headless, so DNS and EndpointSlices list every worker: the router picks, not kube-proxy."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _worker_metadata(owner, spec, role, defaults),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner, role),
            "ports": [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def disruption_budget(
    owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults
) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _worker_metadata(owner, spec, role, defaults),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner, role)}},
    }


def desired_children(
    owner: Owner, spec: ModelDeploymentSpec, defaults: Defaults | None = None
) -> list[dict[str, Any]]:
    """Every object the ModelDeployment should own, in the order they should be applied."""
    defaults = defaults or Defaults()
    config = config_map(owner, spec, defaults)
    children = [config, *kv_tier_objects(owner, spec, defaults)]
    for role in WORKER_ROLES:
        children.append(worker_service(owner, spec, role, defaults))
        children.append(worker_deployment(owner, spec, role, defaults, config["data"]))
        children.append(disruption_budget(owner, spec, role, defaults))
    return children


def all_child_refs(owner: Owner) -> list[dict[str, Any]]:
    """Every child any spec could produce (kind, name): what to prune or delete, spec or not."""
    refs = [("ConfigMap", "config"), ("Deployment", "kv"), ("Service", "kv")]
    for role in WORKER_ROLES:
        refs += [("Service", role), ("Deployment", role), ("PodDisruptionBudget", role)]
    return [
        {"kind": kind, "metadata": {"name": child_name(owner.name, suffix), "namespace": owner.namespace}}
        for kind, suffix in refs
    ]

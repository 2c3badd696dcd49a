"""Desired state: a ModelDeployment spec in, the Kubernetes objects that serve it out.

Pure functions with no API calls, so every spec can be checked offline (schema-validated and
checked against the ``restricted`` Pod Security profile in the tests) and the handlers only diff
and apply. Each child is fully described here, including its labels and ownerReference, which is
what makes create-or-patch idempotent and drift repair exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tusk.operator import schema
from tusk.operator.spec import ModelDeploymentSpec, RoleSpec

from tusk.config import EngineConfig, KVTierConfig, Role, WorkerConfig
from tusk.kvserver import server_args

GRPC_PORT = 50051
HTTP_PORT = 8000  # decode workers' OpenAI HTTP API (a Gateway's InferencePool targets it)
METRICS_PORT = 9090
KV_PORT = 6379
CONFIG_MOUNT = "/etc/tusk"
MODELS_MOUNT = "/models"
CACHE_MOUNT = "/var/cache/tusk"
HF_CACHE_MOUNT = f"{CACHE_MOUNT}/huggingface"
TMP_MOUNT = "/tmp"
# One scheme for every worker image: {flavor} is the accelerator's build (cpu, cuda, rocm, xpu).
DEFAULT_WORKER_IMAGE = "ghcr.io/tusk-dev/tusk-worker-{flavor}:0.1.0"
SERVED_NAMES_ANNOTATION = "tusk.dev/served-model-names"
# On a worker Deployment: the pod-spec fields this operator wrote, so a field that a podTemplate
# added (or removed) and later stops adding is taken away again, as kubectl apply's last-applied does.
POD_FIELDS_ANNOTATION = "tusk.dev/pod-spec-fields"
KV_PASSWORD_ENV = "TUSK_KV_TIER_PASSWORD"
KV_URL_ENV = "TUSK_KV_TIER_URL"
KV_PASSWORD_KEY = "password"
# A Secret whose listed keys the operator fills with random values when it creates it, once.
GENERATED_KEYS_ANNOTATION = "tusk.dev/generated-keys"
# Non-root users of the images: the tusk images create uid/gid 10001; the official Valkey image's
# "valkey" user is 999 (its entrypoint would switch to it, but only when started as root).
WORKER_UID = 10001
VALKEY_UID = 999
VIDEO_GID = 44  # AMD and Intel device nodes are group "video" (and "render", whose gid varies by host)
WORKER_ROLES = ("prefill", "decode")
# Names of the pod volumes the operator itself defines; a role's own volumes must not reuse them.
RESERVED_VOLUMES = frozenset({"config", "cache", "tmp", "models", "hf-cache"})


@dataclass(frozen=True)
class AcceleratorKind:
    """How one ``accelerator`` value maps onto a cluster and a worker build."""

    resource: str | None  # device-plugin resource (also the taint key GPU node pools carry)
    flavor: str  # worker image flavor
    device: str  # the engine's torch device


ACCELERATORS: dict[str, AcceleratorKind] = {
    "cpu": AcceleratorKind(None, "cpu", "cpu"),
    "nvidia": AcceleratorKind("nvidia.com/gpu", "cuda", "cuda"),
    "amd": AcceleratorKind("amd.com/gpu", "rocm", "cuda"),  # ROCm torch calls its device "cuda"
    "intel": AcceleratorKind("gpu.intel.com/i915", "xpu", "xpu"),
}


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


def worker_image(role_spec: RoleSpec, spec: ModelDeploymentSpec, defaults: Defaults) -> str:
    """The role's image, else the spec's, else the operator's template for this accelerator."""
    flavor = ACCELERATORS[role_spec.accelerator].flavor
    return role_spec.image or spec.image or defaults.worker_image.replace("{flavor}", flavor)


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


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# --- Security ------------------------------------------------------------------------------------


def pod_security(uid: int, supplemental_groups: list[int] | None = None) -> dict[str, Any]:
    """Pod-level settings the ``restricted`` Pod Security Standard requires (and fsGroup for volumes)."""
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if supplemental_groups:
        context["supplementalGroups"] = supplemental_groups
    return context


def container_security() -> dict[str, Any]:
    """Per container: nothing gained at runtime, nothing written outside the mounted volumes."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# --- KV tier -------------------------------------------------------------------------------------


def kv_tier_url(owner: Owner, spec: ModelDeploymentSpec) -> str | None:
    """The URL workers use, without any password (that comes from a Secret via the environment)."""
    if spec.kv_tier.external is not None:
        return spec.kv_tier.external.url
    if spec.kv_tier.managed is not None and spec.kv_tier.managed.replicas > 0:
        return f"redis://{child_name(owner.name, 'kv')}.{owner.namespace}.svc:{KV_PORT}/0"
    return None


def kv_auth_secret_name(owner: Owner) -> str:
    return child_name(owner.name, "kv-auth")


def maxmemory_bytes(memory: int | str) -> int:
    """80% of the container limit: the rest covers fragmentation and client buffers (no OOM kills)."""
    from kubernetes.utils import parse_quantity

    return int(parse_quantity(memory) * 8 // 10)


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def kv_tier_objects(owner: Owner, spec: ModelDeploymentSpec, defaults: Defaults) -> list[dict[str, Any]]:
    """The per-model Valkey: password from a generated Secret, reachable only by this model's
    workers and the router (NetworkPolicy), running as the image's non-root user."""
    managed = spec.kv_tier.managed
    if managed is None:
        return []
    name = child_name(owner.name, "kv")
    object_labels = labels(owner, "kv-tier", "kv-tier", "tusk-kv-tier", defaults)
    args = server_args(str(maxmemory_bytes(managed.memory)), managed.maxmemory_policy, KV_PORT)
    probe = {"tcpSocket": {"port": "redis"}, "periodSeconds": 10, "timeoutSeconds": 2}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(
            owner,
            kv_auth_secret_name(owner),
            object_labels,
            annotations={GENERATED_KEYS_ANNOTATION: KV_PASSWORD_KEY},
        ),
        "type": "Opaque",
    }
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
                    "securityContext": pod_security(VALKEY_UID),
                    "containers": [
                        {
                            "name": "valkey",
                            "image": managed.image,
                            "imagePullPolicy": defaults.image_pull_policy,
                            # Started directly as uid 999 (the pod's securityContext), so the image's
                            # entrypoint has no root to drop. $(VAR) is expanded by the kubelet.
                            "command": ["valkey-server"],
                            "args": [*args, "--requirepass", f"$({KV_PASSWORD_ENV})"],
                            "env": [
                                _secret_env(KV_PASSWORD_ENV, kv_auth_secret_name(owner), KV_PASSWORD_KEY)
                            ],
                            "ports": [{"name": "redis", "containerPort": KV_PORT, "protocol": "TCP"}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": managed.memory},
                                "limits": {"memory": managed.memory},
                            },
                            "readinessProbe": probe,
                            "livenessProbe": {**probe, "initialDelaySeconds": 5},
                            "securityContext": container_security(),
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    # No persistence (--save "" --appendonly no); the working directory stays writable.
                    "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "64Mi"}}],
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
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, name, object_labels),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, "kv-tier")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        # This model's workers (same namespace).
                        {
                            "podSelector": {
                                "matchLabels": {
                                    "tusk.dev/model": owner.name,
                                    "app.kubernetes.io/name": "tusk-worker",
                                }
                            }
                        },
                        # The router, wherever the chart installed it.
                        {
                            "namespaceSelector": {},
                            "podSelector": {
                                "matchLabels": {
                                    "app.kubernetes.io/part-of": "tusk",
                                    "app.kubernetes.io/name": "tusk-router",
                                }
                            },
                        },
                    ],
                    "ports": [{"port": "redis", "protocol": "TCP"}],
                }
            ],
        },
    }
    return [secret, deployment, service, policy]


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
    role_spec: RoleSpec = getattr(spec, role)
    engine = EngineConfig(
        dtype=spec.dtype,
        device=ACCELERATORS[role_spec.accelerator].device,
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
        http_port=HTTP_PORT if role == "decode" else None,
        engine=engine,
        kv_tier=KVTierConfig(url=kv_tier_url(owner, spec)),
    )


def config_data(owner: Owner, spec: ModelDeploymentSpec, role: str) -> dict[str, str]:
    return {"worker.json": worker_config(owner, spec, role).model_dump_json(indent=2)}


def config_map_name(owner: Owner, role: str, data: dict[str, str]) -> str:
    """Named by content: a new config is a new ConfigMap, so a pod of the previous rollout that
    restarts still reads the config it was started with."""
    return child_name(owner.name, f"{role}-{content_hash(json.dumps(data, sort_keys=True))}")


def config_map(owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults) -> dict[str, Any]:
    data = config_data(owner, spec, role)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            owner, config_map_name(owner, role, data), labels(owner, "config", role, "tusk", defaults)
        ),
        # Never edited in place: a change is a new name.
        "immutable": True,
        "data": data,
    }


def config_selector(owner: Owner) -> str:
    """Label selector of every config ConfigMap of this owner (old ones are pruned after rollouts)."""
    return f"tusk.dev/model={owner.name},app.kubernetes.io/component=config"


# --- Workers -------------------------------------------------------------------------------------


def worker_env(owner: Owner, spec: ModelDeploymentSpec, role_spec: RoleSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TUSK_CACHE_DIR", "value": CACHE_MOUNT},
        {"name": "HF_HOME", "value": HF_CACHE_MOUNT},
        # The root filesystem is read-only: every library cache goes under the cache volume.
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_MOUNT}/xdg"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_MOUNT}/triton"},
        {"name": "HOME", "value": TMP_MOUNT},
    ]
    token = spec.model.token_secret_ref
    if token is not None:
        env.append(_secret_env("HF_TOKEN", token.name, token.key))
    external, managed = spec.kv_tier.external, spec.kv_tier.managed
    password_ref = None
    if external is not None and external.secret_ref is not None:
        password_ref = (external.secret_ref.name, external.secret_ref.key)
    elif managed is not None and managed.replicas > 0:
        password_ref = (kv_auth_secret_name(owner), KV_PASSWORD_KEY)
    url = kv_tier_url(owner, spec)
    if password_ref is not None and url is not None:
        # Kubernetes expands $(VAR) from earlier entries, so the password never lands in the ConfigMap.
        env.append(_secret_env(KV_PASSWORD_ENV, *password_ref))
        scheme, _, rest = url.partition("://")
        env.append({"name": KV_URL_ENV, "value": f"{scheme}://:$({KV_PASSWORD_ENV})@{rest}"})
    env.extend(role_spec.env)
    return env


def _copies_model_locally(spec: ModelDeploymentSpec) -> bool:
    """Whether each pod holds its own model copy on node disk (image:// copy, hf:// without a PVC)."""
    kind = spec.model.kind
    return kind == "image" or (kind == "hf" and not spec.model.cache.persistent_volume_claim)


def _resources(spec: ModelDeploymentSpec, role_spec: RoleSpec) -> dict[str, Any]:
    limits = dict(role_spec.resources.limits)
    requests = dict(role_spec.resources.requests)
    device = ACCELERATORS[role_spec.accelerator].resource
    if device is not None:
        limits.setdefault(device, role_spec.accelerators_per_replica)
    if _copies_model_locally(spec):
        # The scheduler then places the pod where the model copy fits on local disk.
        requests.setdefault("ephemeral-storage", spec.model.cache.size_limit)
    resources: dict[str, Any] = {}
    if limits:
        resources["limits"] = limits
    if requests:
        resources["requests"] = requests
    return resources


def _volumes(
    spec: ModelDeploymentSpec, config_name: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, worker volumeMounts, initContainers) for config, caches and the model source."""
    source, cache = spec.model, spec.model.cache
    shared_cache = cache.persistent_volume_claim
    model_copy: dict[str, Any] = {"sizeLimit": cache.size_limit}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name}},
        # hf:// downloads land here (HF_HOME) unless a shared cache PVC is mounted over it.
        {"name": "cache", "emptyDir": model_copy if source.kind == "hf" and not shared_cache else {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": TMP_MOUNT},
    ]
    init: list[dict[str, Any]] = []
    if source.kind == "hf" and shared_cache:
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": shared_cache}})
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_MOUNT})
    if source.kind == "pvc":
        claim = source.source[len("pvc://") :].partition("/")[0]
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
    elif source.kind == "image":
        volumes.append({"name": "models", "emptyDir": model_copy})
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
        init.append(
            {
                "name": "model",
                "image": source.source[len("image://") :],
                # No shell: the path is one argument to cp, whatever characters it holds.
                "command": ["cp", "-R", "--", f"{source.image_path.rstrip('/')}/.", f"{MODELS_MOUNT}/"],
                "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT}],
                "securityContext": container_security(),
            }
        )
    return volumes, mounts, init


def _merge_key(path: str) -> str | None:
    """Strategic-merge keys of the pod-template lists (as in the Kubernetes API), else replace."""
    return {
        "containers": "name",
        "initContainers": "name",
        "ephemeralContainers": "name",
        "volumes": "name",
        "env": "name",
        "imagePullSecrets": "name",
        "volumeMounts": "mountPath",
        "ports": "containerPort",
    }.get(path)


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Apply a strategic-merge patch the way the API server does for pod templates: maps merge,
    ``null`` deletes, lists with a merge key (containers by name, ...) merge item by item (an item
    with ``$patch: delete`` is removed), other lists are replaced."""
    if isinstance(patch, dict) and isinstance(base, dict):
        merged = dict(base)
        for k, value in patch.items():
            if value is None:
                merged.pop(k, None)
            else:
                merged[k] = strategic_merge(base.get(k), value, k)
        return merged
    merge_key = _merge_key(key) if key else None
    if isinstance(patch, list) and isinstance(base, list) and merge_key:
        merged_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                merged_list.append(copy.deepcopy(item))
                continue
            index = next((i for i, b in enumerate(merged_list) if b.get(merge_key) == item[merge_key]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    merged_list.pop(index)
            elif index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def worker_deployment(
    owner: Owner, spec: ModelDeploymentSpec, role: str, defaults: Defaults, config_name: str
) -> dict[str, Any]:
    role_spec: RoleSpec = getattr(spec, role)
    pod_labels = _worker_labels(owner, spec, role, defaults)
    volumes, mounts, init = _volumes(spec, config_name)
    tolerations = list(role_spec.tolerations)
    accelerator = ACCELERATORS[role_spec.accelerator]
    if accelerator.resource is not None:
        # GPU node pools are commonly tainted with the device resource name. No node selector: the
        # resource request schedules the pod, and the labels vary by provider.
        tolerations.append({"key": accelerator.resource, "operator": "Exists", "effect": "NoSchedule"})
    tcp = {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "worker",
        "image": worker_image(role_spec, spec, defaults),
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["tusk", "worker", "--config", f"{CONFIG_MOUNT}/worker.json"],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            *([{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}] if role == "decode" else []),
        ],
        "env": worker_env(owner, spec, role_spec),
        "volumeMounts": mounts + list(role_spec.volume_mounts),
        # Loading weights can take many minutes; the startup probe holds liveness off until then.
        "startupProbe": {**tcp, "failureThreshold": 180},
        "readinessProbe": tcp,
        "livenessProbe": {**tcp, "failureThreshold": 6},
        "securityContext": container_security(),
    }
    resources = _resources(spec, role_spec)
    if resources:
        container["resources"] = resources
    groups = [VIDEO_GID] if role_spec.accelerator in ("amd", "intel") else None
    pod_spec: dict[str, Any] = {
        # Always explicit: the server would fill "default", and an override removed later must revert.
        "serviceAccountName": role_spec.service_account_name or "default",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 45,
        "securityContext": pod_security(WORKER_UID, groups),
        "containers": [container],
        "volumes": volumes + list(role_spec.volumes),
    }
    optional = {
        "initContainers": init,
        "nodeSelector": dict(role_spec.node_selector),
        "tolerations": tolerations,
        "affinity": role_spec.affinity,
        "imagePullSecrets": list(role_spec.image_pull_secrets),
        "priorityClassName": role_spec.priority_class_name,
        "runtimeClassName": role_spec.runtime_class_name,
        "topologySpreadConstraints": list(role_spec.topology_spread_constraints),
    }
    pod_spec.update({key: value for key, value in optional.items() if value})
    template: dict[str, Any] = {
        "metadata": {
            "labels": pod_labels,
            "annotations": {SERVED_NAMES_ANNOTATION: ",".join(served_model_names(owner, spec))},
        },
        "spec": pod_spec,
    }
    if role_spec.pod_template:
        template = strategic_merge(template, role_spec.pod_template)
        # The selector labels must survive any override, or the Deployment would be refused.
        template.setdefault("metadata", {}).setdefault("labels", {}).update(pod_labels)
    rollout = role_spec.rollout
    fields = ",".join(sorted(template.get("spec") or {}))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            owner, child_name(owner.name, role), pod_labels, annotations={POD_FIELDS_ANNOTATION: fields}
        ),
        "spec": {
            "replicas": role_spec.replicas,
            # maxSurge 0 by default: a rollout must not need a spare GPU on a full cluster.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rollout.max_surge, "maxUnavailable": rollout.max_unavailable},
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1800,
            "selector": {"matchLabels": selector_labels(owner, role)},
            "template": template,
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
    children = list(kv_tier_objects(owner, spec, defaults))
    for role in WORKER_ROLES:
        config = config_map(owner, spec, role, defaults)
        children.append(config)
        children.append(worker_service(owner, spec, role, defaults))
        children.append(worker_deployment(owner, spec, role, defaults, config["metadata"]["name"]))
        children.append(disruption_budget(owner, spec, role, defaults))
    from tusk.operator.vllm import apply_engine  # (imports this module)

    return apply_engine(owner, spec, children)


def all_child_refs(owner: Owner) -> list[dict[str, Any]]:
    """Every fixed-name child any spec could produce (kind, name): what to prune or delete, spec or
    not. The content-named ConfigMaps are found by label (``config_selector``)."""
    # (Not the generated kv-auth Secret: the operator may not delete Secrets; the garbage collector
    # removes it with its owner, and a managed tier turned on again reuses it.)
    refs = [("Deployment", "kv"), ("Service", "kv"), ("NetworkPolicy", "kv")]
    for role in WORKER_ROLES:
        refs += [("Service", role), ("Deployment", role), ("PodDisruptionBudget", role)]
    return [
        {"kind": kind, "metadata": {"name": child_name(owner.name, suffix), "namespace": owner.namespace}}
        for kind, suffix in refs
    ]

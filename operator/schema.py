"""The OpenAPI v3 schema of the ModelDeployment custom resource.

Kept as plain Python data so the CRD, the docs example and the operator's defaults come from one
definition: the API server applies these defaults before the operator ever sees an object, and
``tusk.operator.spec`` reads the same field names.
"""

from __future__ import annotations

from typing import Any

GROUP = "tusk.dev"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]

ACCELERATORS = ["nvidia", "amd", "intel", "cpu"]
DTYPES = ["auto", "float32", "float16", "bfloat16"]
MAXMEMORY_POLICIES = [
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "noeviction",
]
# Model sources: the embedded tiny model, a Hugging Face repo, a PVC, a model image, or a path in the image.
MODEL_SOURCE_PATTERN = (
    r"^(tiny|hf://[^/@\s]+/[^/@\s]+(@[^\s]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|image://\S+|/\S*)$"
)
# Longest ModelDeployment name whose children ("<name>-prefill-pdb" ...) still fit a 63-char DNS label.
MAX_NAME_LENGTH = 48


def _str(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _int(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "format": "int32", "description": description, **extra}


def _secret_ref(description: str, default_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["name"],
        "properties": {
            "name": _str("Secret name, in the ModelDeployment's namespace.", minLength=1),
            "key": _str("Key inside the Secret.", default=default_key, minLength=1),
        },
    }


_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}

_RESOURCES = {
    "type": "object",
    "description": "Container resources, as in a Pod. The accelerator resource is added to limits.",
    "properties": {
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
    },
}

_TOLERATION = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer", "format": "int64"},
    },
}

_ENV_VAR = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "valueFrom": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}


def _role(name: str, default_replicas: int, minimum: int) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f"The {name} workers.",
        "default": {},
        "properties": {
            "replicas": _int(f"Number of {name} worker pods.", default=default_replicas),
            "accelerator": _str(
                "Accelerator vendor; sets the device resource and node selector.",
                enum=ACCELERATORS,
                default="cpu",
            ),
            "acceleratorsPerReplica": _int("Devices per worker pod (ignored for cpu).", default=1, minimum=1),
            "resources": _RESOURCES,
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array", "items": _TOLERATION},
            "affinity": {
                "type": "object",
                "description": "Pod affinity rules, as in a Pod spec.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "env": {"type": "array", "items": _ENV_VAR},
            "image": _str("Worker image for this role; defaults to spec.image, then the operator's default."),
            "imagePullSecrets": {
                "type": "array",
                "description": "Secrets for pulling the worker image, as in a Pod spec.",
                "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
            "serviceAccountName": _str("ServiceAccount the worker pods run as."),
            "priorityClassName": _str("PriorityClass of the worker pods."),
            "runtimeClassName": _str("RuntimeClass of the worker pods (e.g. nvidia)."),
            "topologySpreadConstraints": {
                "type": "array",
                "description": "Topology spread constraints, as in a Pod spec.",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
            "volumes": {
                "type": "array",
                "description": "Extra pod volumes, as in a Pod spec.",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
            "volumeMounts": {
                "type": "array",
                "description": "Extra volume mounts of the worker container.",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
            "podTemplate": {
                "type": "object",
                "description": "Strategic-merge patch applied last onto the generated pod template.",
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "rollout": {
                "type": "object",
                "default": {},
                "properties": {
                    "maxSurge": {"x-kubernetes-int-or-string": True, "default": 0},
                    "maxUnavailable": {"x-kubernetes-int-or-string": True, "default": 1},
                },
            },
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.replicas >= {minimum}",
                "message": f"{name}.replicas must be at least {minimum}",
                "fieldPath": ".replicas",
            }
        ],
    }


def spec_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "source": _str(
                        "tiny | hf://ORG/NAME[@REVISION] | pvc://CLAIM[/SUBPATH] | image://IMAGE | /absolute/path",
                        pattern=MODEL_SOURCE_PATTERN,
                    ),
                    "tokenSecretRef": _secret_ref("Hugging Face token for hf:// sources.", "token"),
                    "imagePath": _str(
                        "Folder holding the model inside an image:// source.", default="/model"
                    ),
                    "cache": {
                        "type": "object",
                        "default": {},
                        "properties": {
                            "sizeLimit": {**_QUANTITY, "default": "20Gi"},
                            "persistentVolumeClaim": _str("Shared model-cache PVC."),
                        },
                    },
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
                        "message": "model.tokenSecretRef is only used with hf:// sources",
                    }
                ],
            },
            "servedModelNames": {
                "type": "array",
                "description": "Names clients use in the OpenAI API; defaults to the ModelDeployment name.",
                "items": {"type": "string", "minLength": 1},
                "x-kubernetes-list-type": "set",
            },
            "tokenizer": _str("Tokenizer folder or hf:// id, when it differs from the model."),
            "dtype": _str("Weights and activations dtype.", enum=DTYPES, default="auto"),
            "maxModelLen": _int("Longest sequence (prompt + output) in tokens.", minimum=1),
            "blockSize": _int(
                "KV block size in tokens; must match across roles.", default=16, minimum=1, maximum=1024
            ),
            "image": _str("Worker image; defaults to the operator's --worker-image."),
            "engine": {
                "type": "object",
                "description": "Engine knobs passed to every worker.",
                "properties": {
                    "maxNumSeqs": _int("Concurrent sequences per worker.", minimum=1),
                    "maxNumBatchedTokens": _int("Tokens per engine step.", minimum=1),
                    "kvCacheMemoryFraction": {"type": "number", "minimum": 0.05, "maximum": 1},
                    "kernelBackend": _str("Force a tusk.kernels backend (torch, triton)."),
                },
            },
            "prefill": _role("prefill", 0, 0),
            "decode": _role("decode", 1, 1),
            "kvTier": {
                "type": "object",
                "description": "Shared KV block tier: a managed Valkey, an external Redis-compatible URL, or none ({}).",
                "default": {"managed": {}},
                "properties": {
                    "managed": {
                        "type": "object",
                        "properties": {
                            "replicas": _int(
                                "0 stops the tier; one server per deployment.", default=1, minimum=0
                            ),
                            "memory": {
                                **_QUANTITY,
                                "description": "Memory limit of the server; maxmemory is set to 80% of it.",
                                "default": "1Gi",
                            },
                            "maxmemoryPolicy": _str(
                                "Eviction policy.", enum=MAXMEMORY_POLICIES, default="allkeys-lru"
                            ),
                            "image": _str("Server image.", default="valkey/valkey:8.1.4"),
                        },
                        "x-kubernetes-validations": [
                            {
                                "rule": "self.replicas <= 1",
                                "message": "kvTier.managed runs at most one server; use kvTier.external for a cluster",
                            }
                        ],
                    },
                    "external": {
                        "type": "object",
                        "required": ["url"],
                        "properties": {
                            "url": _str(
                                "redis://, rediss://, valkey:// or unix:// URL without the password.",
                                pattern=r"^(redis|rediss|valkey|valkeys|unix)://\S+$",
                            ),
                            "secretRef": _secret_ref("Secret holding the tier password.", "password"),
                        },
                    },
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "!(has(self.managed) && has(self.external))",
                        "message": "kvTier: set either external (url) or managed, not both",
                    }
                ],
            },
            "routing": {
                "type": "object",
                "default": {},
                "properties": {
                    "policy": _str("Router policy for this model.", default="cost", minLength=1),
                    "disaggregationThreshold": _int(
                        "Uncached prompt tokens above which prefill runs on a prefill worker; unset = tuned online.",
                        minimum=0,
                    ),
                },
            },
            "paused": {
                "type": "boolean",
                "default": False,
                "description": "Stop changing children (no rollouts, no drift repair); status is still reported.",
            },
        },
    }


def _role_status() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "replicas": _int("Pods the Deployment has."),
            "readyReplicas": _int("Pods that are ready."),
            "updatedReplicas": _int("Pods on the latest spec."),
            "ready": _str("readyReplicas/desired, for kubectl get."),
            "selector": _str("Label selector of the role's pods (scale subresource)."),
        },
    }


def status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "phase": _str("Pending, Progressing, Ready, Degraded or Paused."),
            "observedGeneration": {"type": "integer", "format": "int64"},
            "endpoint": _str("OpenAI-compatible base URL that serves this model."),
            "servedModelNames": {"type": "array", "items": {"type": "string"}},
            "kvTierUrl": _str("KV tier URL the workers use (no password)."),
            "prefill": _role_status(),
            "decode": _role_status(),
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer", "format": "int64"},
                    },
                },
            },
        },
        # kopf keeps its own bookkeeping under status.kopf when it cannot use annotations.
        "x-kubernetes-preserve-unknown-fields": True,
    }


def resource_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)",
            },
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS label starting with a letter (it names Services)",
            },
        ],
    }

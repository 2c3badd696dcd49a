"""The OpenAPI v3 schema of the ModelDeployment custom resource, generated from ``tusk.operator.spec``.

The spec's pydantic models are the one definition of every field, default and bound; this module
turns them into the structural schema the API server wants, so the CRD and the operator cannot
disagree. The API server checks what this produces in ways an emulator does not: every CEL rule
must hold on every ``default`` as written (nested defaults are not filled in first), so rules
guard optional fields with ``has()`` and bounds are plain ``minimum``/``maximum`` where possible.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from tusk.operator import spec

GROUP = "tusk.dev"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]

# Re-exported: the spec module is where they are defined.
ACCELERATORS = list(spec.ACCELERATORS)
DTYPES = list(spec.DTYPES)
MAXMEMORY_POLICIES = list(spec.MAXMEMORY_POLICIES)
MODEL_SOURCE_PATTERN = spec.MODEL_SOURCE_PATTERN
# Longest ModelDeployment name whose children ("<name>-prefill-pdb" ...) still fit a 63-char DNS label.
MAX_NAME_LENGTH = 48

# Keys of json_schema_extra that steer generation and never reach the CRD.
_PRIVATE_KEYS = {"maximumReason"}


def _constraints(node: dict[str, Any], metadata: list[Any]) -> None:
    """Copy pydantic/annotated-types constraints onto an OpenAPI node."""
    is_string = node.get("type") == "string"
    is_array = node.get("type") == "array"
    for item in metadata:
        if isinstance(item, FieldInfo):
            _constraints(node, list(item.metadata))
            if isinstance(item.json_schema_extra, dict):
                node.update(item.json_schema_extra)
            continue
        for attr, key in (("ge", "minimum"), ("le", "maximum")):
            if getattr(item, attr, None) is not None:
                node[key] = getattr(item, attr)
        for attr, key in (("gt", "minimum"), ("lt", "maximum")):
            if getattr(item, attr, None) is not None:
                node[key] = getattr(item, attr)
                node[f"exclusive{key.capitalize()}"] = True
        if getattr(item, "min_length", None) is not None:
            node["minItems" if is_array else "minLength"] = item.min_length
        if getattr(item, "max_length", None) is not None:
            node["maxItems" if is_array else "maxLength"] = item.max_length
        if is_string and getattr(item, "pattern", None) is not None:
            node["pattern"] = item.pattern


def _type_node(annotation: Any) -> dict[str, Any]:
    """The OpenAPI node of a Python type (constraints aside)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        node = _type_node(args[0])
        _constraints(node, list(args[1:]))
        return node
    if origin in (types.UnionType, typing.Union):
        present = [a for a in args if a is not type(None)]
        if set(present) == {int, str}:
            return {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
        if len(present) != 1:
            raise TypeError(f"no OpenAPI form for {annotation}")
        return _type_node(present[0])
    if origin is Literal:
        kinds = {type(a) for a in args}
        if kinds != {str}:
            raise TypeError(f"only string enums are supported: {annotation}")
        return {"type": "string", "enum": list(args)}
    if origin is dict:
        value = args[1] if args else Any
        if value is Any:
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "additionalProperties": _type_node(value)}
    if origin is list:
        item = args[0] if args else Any
        return {"type": "array", "items": _type_node(item)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return object_schema(annotation)
    simple = {
        bool: {"type": "boolean"},
        int: {"type": "integer", "format": "int32"},
        float: {"type": "number"},
    }
    simple[str] = {"type": "string"}
    if annotation in simple:
        return dict(simple[annotation])
    if annotation is Any:
        return {"x-kubernetes-preserve-unknown-fields": True}
    raise TypeError(f"no OpenAPI form for {annotation}")


def _default(info: FieldInfo) -> Any:
    """The CRD default of a field: what the user would have to write to get the pydantic default.

    A nested model's default is written as the fields set explicitly (``{}`` for a default
    instance), so the API server fills the rest from the nested defaults, as pydantic does.
    Empty lists and maps get no default: absent and empty mean the same to the operator.
    """
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined or value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(value, list | dict) and not value:
        return None
    return value


def _maximum_rule(key: str, limit: Any, reason: str) -> dict[str, str]:
    return {
        "rule": f"!has(self.{key}) || self.{key} <= {limit}",
        "message": f"{key} must be at most {limit}: {reason}",
        "fieldPath": f".{key}",
        "reason": spec.CEL_FORBIDDEN,
    }


def object_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of one spec model: typed properties, defaults and CEL rules."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    rules = list((model.model_config.get("json_schema_extra") or {}).get("x-kubernetes-validations", []))
    for name, info in model.model_fields.items():
        key = info.alias or name
        node = _type_node(info.annotation)
        _constraints(node, list(info.metadata))
        if isinstance(info.json_schema_extra, dict):
            node.update({k: v for k, v in info.json_schema_extra.items() if k not in _PRIVATE_KEYS})
            if "maximumReason" in info.json_schema_extra:
                rules.append(_maximum_rule(key, node["maximum"], info.json_schema_extra["maximumReason"]))
        if info.description:
            node["description"] = info.description
        if info.is_required():
            required.append(key)
        else:
            default = _default(info)
            if default is not None:
                node["default"] = default
        properties[key] = node
    out: dict[str, Any] = {"type": "object"}
    if model.__doc__:
        out["description"] = " ".join(model.__doc__.split())
    if required:
        out["required"] = required
    out["properties"] = properties
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def spec_schema() -> dict[str, Any]:
    return object_schema(spec.ModelDeploymentSpec)


def _str(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _int(description: str) -> dict[str, Any]:
    return {"type": "integer", "format": "int32", "description": description}


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
        "description": "What the operator observed; written by the operator only.",
        "properties": {
            "phase": _str("Pending, Progressing, Ready, ScaledToZero, Degraded or Paused."),
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
        "description": "A model served by tusk: prefill and decode workers, a KV tier and routing settings.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        # Rules on metadata.name sit at the root (the schema may not describe metadata fields),
        # so they carry no fieldPath; their messages name the field.
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child names add suffixes)",
                "reason": spec.CEL_INVALID,
            },
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS label starting with a letter (it names Services)",
                "reason": spec.CEL_INVALID,
            },
        ],
    }

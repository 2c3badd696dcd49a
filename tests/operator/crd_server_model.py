"""What a real Kubernetes API server does with a CustomResourceDefinition and its objects.

The emulator (kmock) stores custom resources as given. A real kube-apiserver does much more, and
the tests model that here so that its refusals show up without a cluster:

- when the CRD is created, every ``default`` in the schema is validated *as written*: against its
  node's OpenAPI schema, for unknown fields, and with the CEL rules (x-kubernetes-validations) of
  its node and every node below, without filling in nested defaults first;
- the schema must be structural, and every rule must compile, name a valid ``reason`` and a
  ``fieldPath`` that exists;
- when an object is created: unknown fields are refused (kubectl's default strict field
  validation), the structural defaulting algorithm fills in defaults, then the OpenAPI schema and
  every CEL rule are checked.

CEL is evaluated with the ``common-expression-language`` package. Errors are reported the way the
server words them: ``<field path>: <message>``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema

# xds-protos installs an empty cel/__init__.py over this package's (both ship a ``cel`` folder),
# so the Rust extension module is imported directly; it is there whichever was installed last.
from cel.cel import compile as cel_compile
from cel.cel import evaluate as cel_evaluate

CEL_REASONS = {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}


class Refused(AssertionError):
    """The API server would refuse the object; ``errors`` are its messages."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def storage_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


# --- walking -------------------------------------------------------------------------------------


def nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(path, node) of every node of a structural schema; list items are ``path[*]``."""
    out = [(path, schema)]
    for key, child in (schema.get("properties") or {}).items():
        out += nodes(child, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        out += nodes(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += nodes(schema["additionalProperties"], f"{path}[*]")
    return out


def _is_int_or_string(node: dict[str, Any]) -> bool:
    return bool(node.get("x-kubernetes-int-or-string"))


def _keeps_unknown(node: dict[str, Any]) -> bool:
    return bool(node.get("x-kubernetes-preserve-unknown-fields"))


# --- the CRD's own admission ---------------------------------------------------------------------


def structural_errors(schema: dict[str, Any]) -> list[str]:
    """The structural-schema rules the server enforces on a CRD (the subset this project uses)."""
    errors = []
    for path, node in nodes(schema):
        where = path or "<root>"
        if _is_int_or_string(node):
            if node.get("anyOf") not in (None, [{"type": "integer"}, {"type": "string"}]):
                errors.append(f"{where}: int-or-string allows only anyOf: [integer, string]")
            if "type" in node:
                errors.append(f"{where}: int-or-string must not have a type")
        elif node.get("type") not in _TYPES and not _keeps_unknown(node):
            errors.append(f"{where}: type must be one of {sorted(_TYPES)} (structural schema)")
        elif "anyOf" in node or "oneOf" in node or "allOf" in node:
            errors.append(f"{where}: logical junctors are not used outside int-or-string here")
        if "properties" in node and "additionalProperties" in node:
            errors.append(f"{where}: properties and additionalProperties are mutually exclusive")
        if node.get("x-kubernetes-preserve-unknown-fields") is False:
            errors.append(f"{where}: x-kubernetes-preserve-unknown-fields must be true or absent")
        if "$ref" in node:
            errors.append(f"{where}: $ref is not allowed")
        if node.get("x-kubernetes-list-type") == "set" and node["items"].get("type") in ("object", "array"):
            errors.append(f"{where}: list-type set needs scalar items")
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in item.get("properties", {}):
                    errors.append(f"{where}: list-map key {key} is not a property of the items")
                elif key not in item.get("required", []) and "default" not in item["properties"][key]:
                    errors.append(f"{where}: list-map key {key} must be required or defaulted")
    metadata = (schema.get("properties") or {}).get("metadata")
    if metadata and set(metadata.get("properties", {})) - {"name", "generateName"}:
        errors.append(".metadata: only name and generateName may be specified")
    if "default" in schema or (metadata and "default" in metadata):
        errors.append("<root>: defaults are not allowed at the root or in metadata")
    return errors


def _field_path_exists(node: dict[str, Any], field_path: str) -> bool:
    current = node
    for part in field_path.lstrip(".").split("."):
        properties = current.get("properties") or {}
        if part not in properties:
            return False
        current = properties[part]
    return True


def rule_errors(schema: dict[str, Any]) -> list[str]:
    """Every rule compiles and carries a message, a valid reason and a fieldPath that exists."""
    errors = []
    for path, node in nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            where = f"{path or '<root>'}: rule {rule['rule']!r}"
            try:
                cel_compile(rule["rule"])
            except Exception as exc:  # noqa: BLE001 - the binding raises plain ValueErrors
                errors.append(f"{where}: does not compile: {exc}")
            message = rule.get("message", "")
            if not message or "\n" in message or len(message) > 512:
                errors.append(f"{where}: needs a one-line message")
            if "reason" in rule and rule["reason"] not in CEL_REASONS:
                errors.append(f"{where}: reason must be one of {sorted(CEL_REASONS)}")
            if "fieldPath" in rule and not _field_path_exists(node, rule["fieldPath"]):
                errors.append(f"{where}: fieldPath {rule['fieldPath']} is not a field of this node")
            # The server estimates each rule's cost from the sizes the schema allows; a string or
            # list without a bound is costed at the request size limit and can exceed the budget.
            for field in set(re.findall(r"self\.(\w+)", rule["rule"])) - {"metadata"}:
                child = (node.get("properties") or {}).get(field, {})
                bound = {"string": "maxLength", "array": "maxItems"}.get(child.get("type", ""))
                if bound and bound not in child:
                    errors.append(f"{where}: {field} needs {bound} to bound the rule's cost")
    return errors


def default_errors(schema: dict[str, Any]) -> list[str]:
    """The server's check of every default, as written: schema, pruning, then CEL rules."""
    errors = []
    for path, node in nodes(schema):
        if "default" not in node:
            continue
        default = node["default"]
        where = f"{path}.default"
        errors += [f"{where}: {e}" for e in unknown_field_errors(node, default, path)]
        errors += [f"{where}: {e}" for e in openapi_errors(node, default, path)]
        errors += [f"{where}: {e}" for e in cel_errors(node, default, path)]
    return errors


def crd_errors(crd: dict[str, Any]) -> list[str]:
    """Everything the server would refuse when this CRD is created (empty: accepted)."""
    errors = []
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        errors += structural_errors(schema) + rule_errors(schema) + default_errors(schema)
        scale = (version.get("subresources") or {}).get("scale")
        if scale:
            spec_path = scale["specReplicasPath"]
            if not spec_path.startswith(".spec.") or not _field_path_exists(schema, spec_path):
                errors.append(f"scale: specReplicasPath {spec_path} is not a field under .spec")
            for key in ("statusReplicasPath", "labelSelectorPath"):
                if key in scale and not scale[key].startswith(".status."):
                    errors.append(f"scale: {key} must be under .status")
    return errors


# --- an object's admission -----------------------------------------------------------------------


def unknown_field_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields the server would prune; ``kubectl apply`` (strict field validation) refuses them."""
    errors = []
    if isinstance(value, dict) and not _keeps_unknown(schema):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if properties is not None and key in properties:
                errors += unknown_field_errors(properties[key], child, f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += unknown_field_errors(extra, child, f"{path}.{key}")
            elif properties is not None and path != ".metadata":
                errors.append(f'{path}.{key}: unknown field "{key}"')
    elif isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, child in value.items():
            if key in schema["properties"]:
                errors += unknown_field_errors(schema["properties"][key], child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += unknown_field_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def _draft4(schema: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema draft 4 (same keywords; the x-kubernetes ones are dropped)."""
    if isinstance(schema, list):
        return [_draft4(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _draft4(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "default"}
    for key in ("properties",):
        if key in schema:
            out[key] = {name: _draft4(child) for name, child in schema[key].items()}
    out.pop("format", None)
    return out


def openapi_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Types, enums, patterns, bounds and required fields, as the server's OpenAPI validation."""
    return _openapi_errors(schema, value, path)[0]


# Schema errors after which the server skips CEL (apiextensions' hasBlockingErr: NotSupported,
# Required, TooLong, TooMany, TypeInvalid); a bound like maximum does not stop CEL.
_BLOCKING = {"enum", "required", "maxLength", "maxItems", "type", "anyOf"}


def _openapi_errors(schema: dict[str, Any], value: Any, path: str = "") -> tuple[list[str], bool]:
    """(errors, whether one of them is a type or enum error, which stops CEL evaluation)."""
    validator = jsonschema.Draft4Validator(_draft4(schema))
    errors, blocking = [], False
    for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        where = path + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        errors.append(f"{where or '<root>'}: {error.message}")
        blocking = blocking or error.validator in _BLOCKING
    return errors, blocking


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Every x-kubernetes-validations rule on ``value`` and below it, ``self`` bound to each node."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        where = f"{path}{rule.get('fieldPath', '')}" or "<root>"
        message = rule.get("message") or f"failed rule: {rule['rule']}"
        try:
            result = cel_evaluate(rule["rule"], {"self": value})
        except KeyError as exc:
            errors.append(f"{where}: Invalid value: no such key: {exc.args[0]} evaluating rule: {message}")
            continue
        except Exception as exc:  # noqa: BLE001 - a rule that errors refuses the object
            errors.append(f"{where}: Invalid value: {exc} evaluating rule: {message}")
            continue
        if result is not True:
            errors.append(f"{where}: {message}")
    if isinstance(value, dict):
        for key, child in (schema.get("properties") or {}).items():
            if key in value:
                errors += cel_errors(child, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(value) - set(schema.get("properties") or {}):
                errors += cel_errors(extra, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The server's structural defaulting: a missing (or null, non-nullable) property gets a copy
    of its default, then defaulting goes on inside every present value, defaults included."""
    value = copy.deepcopy(value)
    _default_into(schema, value)
    return value


def _default_into(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, child in properties.items():
            missing = key not in value or (value[key] is None and not child.get("nullable"))
            if missing and "default" in child:
                value[key] = copy.deepcopy(child["default"])
        for key, child_value in value.items():
            if key in properties:
                _default_into(properties[key], child_value)
            elif isinstance(schema.get("additionalProperties"), dict):
                _default_into(schema["additionalProperties"], child_value)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_into(schema["items"], item)


def admit(crd: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """What the server stores for ``kubectl apply`` of ``obj``, or Refused with its messages."""
    schema = storage_schema(crd)
    errors = unknown_field_errors(schema, obj)
    if errors:
        raise Refused(errors)
    stored = apply_defaults(schema, obj)
    errors, blocking = _openapi_errors(schema, stored)
    # As the server: CEL rules run unless the object does not have the shape they were written for.
    if blocking:
        errors.append("some validation rules were not checked because the object was invalid")
    else:
        errors += cel_errors(schema, stored)
    if errors:
        raise Refused(errors)
    return stored

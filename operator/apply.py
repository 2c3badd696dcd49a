"""Create-or-patch for owned children: idempotent, drift-correcting, never stealing.

A child is compared with its desired form as a *subset*: the API server adds defaults (container
``terminationMessagePath``, Service ``clusterIPs`` ...) that must not count as drift, while any
field the operator sets and someone changed does. Resource quantities are compared by value: the
server stores them canonicalised ("0.5" comes back as "500m", "2048Mi" as "2Gi"), and a string
compare would patch every resync and never settle. The fix is a JSON merge patch, which replaces
lists whole (so a container list is exact) and deletes map keys the operator set earlier but no
longer wants (``null``), only under the maps it owns outright.
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field
from typing import Any

from tusk.operator.desired import GENERATED_KEYS_ANNOTATION, POD_FIELDS_ANNOTATION
from tusk.operator.kube import ApiError, Kube

# Maps the operator owns completely: extra keys found there are removed, not kept.
OWNED_MAPS: dict[str, list[tuple[str, ...]]] = {
    "Deployment": [
        ("spec", "template", "spec", "nodeSelector"),
        ("spec", "template", "spec", "affinity"),
        # Not the pod-template annotations: `kubectl rollout restart` adds one there, and removing
        # it would roll the pods a second time.
    ],
    "ConfigMap": [("data",)],
}
# Pod-spec lists the operator may stop setting: an absent desired list means "remove".
# (Only fields the server never fills in by itself: removing a defaulted one would patch forever.)
OWNED_OPTIONAL = {
    "Deployment": [
        ("spec", "template", "spec", field)
        for field in (
            "initContainers",
            "tolerations",
            "nodeSelector",
            "affinity",
            "imagePullSecrets",
            "runtimeClassName",
            "topologySpreadConstraints",
        )
    ]
}
# Kinds whose content the operator writes once: a Secret with generated keys is never compared
# (the operator does not read Secret data), only created when missing.
CREATE_ONLY = {"Secret"}


# Map keys whose values are resource quantities in the built-in kinds the operator writes
# (container resources, emptyDir sizeLimit); the server canonicalises exactly these.
QUANTITY_MAPS = frozenset({"limits", "requests"})
QUANTITY_FIELDS = frozenset({"sizeLimit"})


def quantity_equal(desired: Any, live: Any) -> bool:
    """Same amount, however written: 0.5 == "500m", "2048Mi" == "2Gi", 1 == "1"."""
    from kubernetes.utils import parse_quantity

    try:
        return parse_quantity(desired) == parse_quantity(live)
    except (ValueError, TypeError, ArithmeticError):
        return False


def _scalar_equal(desired: Any, live: Any, quantity: bool = False) -> bool:
    if desired == live:
        return True
    if quantity:
        return quantity_equal(desired, live)
    # int-or-string fields may come back as strings ("1" for 1); that is the same value.
    return isinstance(desired, int | str) and isinstance(live, int | str) and str(desired) == str(live)


def is_subset(desired: Any, live: Any, quantity: bool = False) -> bool:
    """True if every field in ``desired`` has the same value in ``live`` (lists: same length, items subset)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            k in live and is_subset(v, live[k], quantity or _quantity_key(k, v)) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(is_subset(d, item) for d, item in zip(desired, live, strict=True))
        )
    return _scalar_equal(desired, live, quantity)


def _quantity_key(key: str, value: Any) -> bool:
    return key in QUANTITY_FIELDS or (key in QUANTITY_MAPS and isinstance(value, dict))


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        obj = obj.setdefault(part, {})
    obj[path[-1]] = value


def drift_patch(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
    """A merge patch that brings ``live`` to ``desired``, or None when nothing differs."""
    kind = desired["kind"]
    patch: dict[str, Any] = {}
    for key in ("spec", "data"):
        if key in desired:
            patch[key] = copy.deepcopy(desired[key])  # removals are written into it below
    patch["metadata"] = {
        "labels": desired["metadata"].get("labels", {}),
        "ownerReferences": desired["metadata"]["ownerReferences"],
    }
    if desired["metadata"].get("annotations"):
        patch["metadata"]["annotations"] = desired["metadata"]["annotations"]
    removals = False
    if kind == "Deployment":
        # Pod-spec fields written last time (podTemplate extras) that the spec no longer sets.
        written = ((live.get("metadata") or {}).get("annotations") or {}).get(POD_FIELDS_ANNOTATION) or ""
        live_pod = _get(live, ("spec", "template", "spec")) or {}
        desired_pod = _get(desired, ("spec", "template", "spec")) or {}
        for name in filter(None, written.split(",")):
            if name not in desired_pod and name in live_pod:
                removals = True
                _set(patch, ("spec", "template", "spec", name), None)
    for path in OWNED_MAPS.get(kind, []):
        live_map, desired_map = _get(live, path), _get(desired, path) or {}
        if isinstance(live_map, dict):
            extra = {k: None for k in live_map if k not in desired_map}
            if extra and desired_map:
                removals = True
                _set(patch, path, {**desired_map, **extra})
    for path in OWNED_OPTIONAL.get(kind, []):
        if _get(desired, path) is None and _get(live, path) not in (None, {}, []):
            removals = True
            _set(patch, path, None)
    if not removals and is_subset(desired, live):
        return None
    return patch


def owned_by(live: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in live.get("metadata", {}).get("ownerReferences") or [])


def _ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


@dataclass
class ApplyResult:
    created: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # same name, someone else's object: left alone
    live: dict[str, dict[str, Any]] = field(default_factory=dict)  # "Kind name" -> object after apply

    @property
    def changed(self) -> bool:
        return bool(self.created or self.repaired)


def with_generated_keys(desired: dict[str, Any]) -> dict[str, Any]:
    """The Secret to create: each key named in the generated-keys annotation gets a random value."""
    keys = (desired["metadata"].get("annotations") or {}).get(GENERATED_KEYS_ANNOTATION)
    if not keys:
        return desired
    values = {key: secrets.token_urlsafe(32) for key in keys.split(",")}
    return {**desired, "stringData": {**desired.get("stringData", {}), **values}}


async def apply_child(kube: Kube, desired: dict[str, Any], owner_uid: str, result: ApplyResult) -> None:
    kind, meta = desired["kind"], desired["metadata"]
    ident = _ident(desired)
    create_only = kind in CREATE_ONLY
    live = await kube.get(kind, meta["namespace"], meta["name"], metadata_only=create_only)
    if live is None:
        try:
            result.live[ident] = await kube.create(with_generated_keys(desired) if create_only else desired)
            if create_only:
                result.live[ident] = {"kind": kind, "metadata": result.live[ident].get("metadata", {})}
            result.created.append(ident)
            return
        except ApiError as exc:
            if exc.status != 409:  # created meanwhile (a re-delivered event): fall through to patch
                raise
            live = await kube.get(kind, meta["namespace"], meta["name"], metadata_only=create_only)
            if live is None:
                raise
    if not owned_by(live, owner_uid):
        result.conflicts.append(ident)
        result.live[ident] = live
        return
    patch = None if create_only else drift_patch(desired, live)
    if patch is None:
        result.unchanged.append(ident)
        result.live[ident] = live
        return
    result.live[ident] = await kube.patch(kind, meta["namespace"], meta["name"], patch)
    result.repaired.append(ident)


async def apply_children(kube: Kube, children: list[dict[str, Any]], owner_uid: str) -> ApplyResult:
    result = ApplyResult()
    for child in children:
        await apply_child(kube, child, owner_uid, result)
    return result


async def read_children(kube: Kube, children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Live objects of the desired children that exist (for status while paused or degraded)."""
    live = {}
    for child in children:
        meta = child["metadata"]
        obj = await kube.get(
            child["kind"], meta["namespace"], meta["name"], metadata_only=child["kind"] in CREATE_ONLY
        )
        if obj is not None:
            live[_ident(child)] = obj
    return live


async def delete_children(kube: Kube, children: list[dict[str, Any]], owner_uid: str) -> list[str]:
    """Delete the children this owner owns (foreign objects with the same name are left alone)."""
    deleted = []
    for child in reversed(children):
        kind, meta = child["kind"], child["metadata"]
        live = await kube.get(kind, meta["namespace"], meta["name"], metadata_only=True)
        if (
            live is not None
            and owned_by(live, owner_uid)
            and await kube.delete(kind, meta["namespace"], meta["name"])
        ):
            deleted.append(_ident(child))
    return deleted


def rollout_settled(deployment: dict[str, Any] | None) -> bool:
    """No pod of an older template is left: the Deployment controller saw the latest spec and every
    replica it counts is updated (a missing Deployment has no pods either)."""
    if deployment is None:
        return True
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return False
    return int(status.get("updatedReplicas") or 0) >= int(status.get("replicas") or 0)


async def prune_configs(
    kube: Kube,
    namespace: str,
    selector: str,
    owner_uid: str,
    current: dict[str, str],
    settled: dict[str, bool],
) -> list[str]:
    """Delete this owner's config ConfigMaps that no current template names, once the role they
    belong to has no pods of an older template left (a restarting old pod still finds its config).

    ``current``: role -> ConfigMap name in use; ``settled``: role -> rollout finished.
    """
    pruned = []
    for config in await kube.list("ConfigMap", namespace, label_selector=selector):
        meta = config.get("metadata") or {}
        role = (meta.get("labels") or {}).get("tusk.dev/role")
        # A config of no current role (the single "<name>-config" of earlier operator versions)
        # goes once every role has rolled.
        done = settled.get(role, False) if role in current else all(settled.values())
        if (
            meta.get("name") not in current.values()
            and done
            and owned_by(config, owner_uid)
            and await kube.delete("ConfigMap", namespace, meta["name"])
        ):
            pruned.append(f"ConfigMap {meta['name']}")
    return pruned

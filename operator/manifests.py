"""The CRD and the operator's RBAC rules, generated from one place.

The Helm chart does not keep its own copy: ``python -m tusk.operator.manifests write-chart DIR``
writes ``DIR/crds/*.yaml`` and ``DIR/files/operator-rbac-rules.yaml`` from the same code the tests
check, so the permissions the operator needs and the ones the chart grants cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from tusk.operator import schema

CRD_NAME = f"{schema.PLURAL}.{schema.GROUP}"
CRD_FILENAME = f"{CRD_NAME}.yaml"
PEERING_FILENAME = "kopf-peering.yaml"
RBAC_FILENAME = "operator-rbac-rules.yaml"

_READY = '.status.conditions[?(@.type=="Ready")].status'

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": _READY},
    {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.ready"},
    {"name": "Decode", "type": "string", "jsonPath": ".status.decode.ready"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The ModelDeployment CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "tusk", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": schema.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": schema.KIND,
                "listKind": f"{schema.KIND}List",
                "plural": schema.PLURAL,
                "singular": schema.SINGULAR,
                "shortNames": list(schema.SHORT_NAMES),
                "categories": ["tusk"],
            },
            "versions": [
                {
                    "name": schema.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema.resource_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.decode.replicas",
                            "statusReplicasPath": ".status.decode.replicas",
                            "labelSelectorPath": ".status.decode.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def _peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    """kopf's peering resources: where operator replicas announce themselves to elect one active."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/part-of": "tusk"}},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    return [
        _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]


# What apply.py calls on every child kind: read one, create, merge-patch drift, delete when pruned.
_CHILD_VERBS = ["get", "create", "patch", "delete"]


def rbac_rules() -> list[dict[str, Any]]:
    """The operator's rules: exactly the calls the handlers, apply.py and kopf make, nothing more
    (tests/operator/test_operator_rbac.py records every call against the emulator and compares).

    Leader election's Lease (get, create, update) is not here: it lives in one namespace and the
    chart grants it with a Role there, never cluster-wide.
    """
    return [
        # The custom resource: kopf watches it and patches its finalizer and annotations; a child
        # event re-reads its owner.
        {
            "apiGroups": [schema.GROUP],
            "resources": [schema.PLURAL],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {"apiGroups": [schema.GROUP], "resources": [f"{schema.PLURAL}/status"], "verbs": ["patch"]},
        # ownerReferences with blockOwnerDeletion need update on the owner's finalizers (admission).
        {"apiGroups": [schema.GROUP], "resources": [f"{schema.PLURAL}/finalizers"], "verbs": ["update"]},
        # Children. Deployments are also watched (status follows rollouts); config ConfigMaps are
        # listed by label to prune the ones no pod template names any more.
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": [*_CHILD_VERBS, "list", "watch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": [*_CHILD_VERBS, "list"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": _CHILD_VERBS},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _CHILD_VERBS},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": _CHILD_VERBS},
        # The Gateway API Inference Extension's InferencePool, a child where its CRD is installed.
        {
            "apiGroups": ["inference.networking.k8s.io"],
            "resources": ["inferencepools"],
            "verbs": _CHILD_VERBS,
        },
        # Secrets: existence checks read metadata only; the managed tier's password Secret is created
        # once (the garbage collector removes it with its owner). Never list, watch or update.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
        # Worker pods, read-only: ImagePullBackOff, CrashLoopBackOff ... become Degraded reasons.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        # Pre-flight: does any node offer the accelerator (a warning only).
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
        # Events for every action and problem (kopf posts core/v1 Events).
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        # kopf's runtime: it watches CRDs (resources appearing) and, namespace-scoped, namespaces.
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        },
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        # kopf peering, only with --peering-name (without --leader-elect).
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings", "kopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        },
    ]


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full: anchors confuse Helm templating and human readers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_HEADER = "# Generated by `python -m tusk.operator.manifests`; do not edit by hand.\n"


def _dump(documents: list[Any]) -> str:
    return _HEADER + yaml.dump_all(documents, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def _dump_one(document: Any) -> str:
    return _HEADER + yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def write_chart(directory: Path) -> list[Path]:
    """Write the CRDs and RBAC rules into a Helm chart folder; returns the files written."""
    crds_dir, files_dir = directory / "crds", directory / "files"
    crds_dir.mkdir(parents=True, exist_ok=True)
    files_dir.mkdir(parents=True, exist_ok=True)
    written = {
        crds_dir / CRD_FILENAME: _dump([crd()]),
        crds_dir / PEERING_FILENAME: _dump(peering_crds()),
        files_dir / RBAC_FILENAME: _dump_one(rbac_rules()),
    }
    for path, text in written.items():
        path.write_text(text)
    return list(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tusk.operator.manifests", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the ModelDeployment CRD (YAML)")
    sub.add_parser("peering-crds", help="print kopf's peering CRDs (YAML)")
    sub.add_parser("rbac", help="print the operator's ClusterRole rules (YAML)")
    chart = sub.add_parser("write-chart", help="write DIR/crds/*.yaml and DIR/files/operator-rbac-rules.yaml")
    chart.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(_dump([crd()]))
    elif args.command == "peering-crds":
        sys.stdout.write(_dump(peering_crds()))
    elif args.command == "rbac":
        sys.stdout.write(_dump_one(rbac_rules()))
    else:
        for path in write_chart(args.directory):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

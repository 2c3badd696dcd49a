"""The Gateway API Inference Extension objects for one model, as plain dicts.

An ``InferencePool`` (``inference.networking.k8s.io/v1``) tells a Gateway which pods serve a
model (``selector``), on which port (``targetPorts``: the workers' OpenAI HTTP port) and which
endpoint picker to ask (``endpointPickerRef``: a Service in front of ``tusk epp``). Pure
builders, so the operator or the chart can render them and tests can check them without a
cluster; nothing here talks to Kubernetes.
"""

from __future__ import annotations

from typing import Any

API_VERSION = "inference.networking.k8s.io/v1"
DEFAULT_WORKER_HTTP_PORT = 8000
DEFAULT_EPP_PORT = 9002  # the port GIE's reference picker and Envoy Gateway expect
WORKER_LABELS = {"app.kubernetes.io/part-of": "tusk", "app.kubernetes.io/name": "tusk-worker"}
MODEL_LABEL = "tusk.dev/model"


def inference_pool(
    name: str,
    namespace: str,
    model_label: str,
    picker_service: str,
    *,
    worker_http_port: int = DEFAULT_WORKER_HTTP_PORT,
    picker_port: int = DEFAULT_EPP_PORT,
    fail_open: bool = False,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The InferencePool of a ModelDeployment's workers (``model_label``: their
    ``tusk.dev/model`` value). ``fail_open`` lets the Gateway route without the picker when it is
    down (GIE's FailOpen); the default, FailClose, refuses instead."""
    if not 0 < worker_http_port < 65536 or not 0 < picker_port < 65536:
        raise ValueError("ports must be in 1..65535")
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "tusk"},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePool",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {**WORKER_LABELS, MODEL_LABEL: model_label}},
            "targetPorts": [{"number": worker_http_port}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker_service,
                "port": {"number": picker_port},
                "failureMode": "FailOpen" if fail_open else "FailClose",
            },
        },
    }

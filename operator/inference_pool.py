"""The Gateway API Inference Extension ``InferencePool`` of each ModelDeployment.

An ``InferencePool`` (``inference.networking.k8s.io/v1``) tells a Gateway which pods serve a
model (``selector``: the model's decode workers, the ones that answer requests), on which port
(``targetPorts``: the workers' OpenAI HTTP port) and which endpoint picker to ask
(``endpointPickerRef``: a Service in front of ``tusk epp``, in the pool's namespace as the API
requires). The operator creates one per ModelDeployment only where the API server serves the
resource: the CRD belongs to the Gateway API Inference Extension, not to tusk, and many clusters
do not have it. Whether it is served is asked through discovery (no RBAC needed) and remembered
for ``REFRESH_S``, so installing the CRD later is noticed within a minute without a discovery
call on every pass.

The pool is an ordinary owned child: created, drift-repaired and never stolen by ``apply``,
deleted with its ModelDeployment.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

from tusk.operator import apply
from tusk.operator.desired import HTTP_PORT, Defaults, Owner, _metadata, labels, selector_labels
from tusk.operator.kube import ApiError, Kube

from tusk.config import EndpointPickerConfig

log = logging.getLogger("tusk.operator.inference_pool")

GROUP = "inference.networking.k8s.io"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferencePool"
PLURAL = "inferencepools"
# The picker Service every pool names (``tusk epp`` behind it); the chart's picker is
# "<release fullname>-epp", which is "tusk-epp" for a release named tusk.
PICKER_SERVICE_ENV = "TUSK_ENDPOINT_PICKER_SERVICE"
DEFAULT_PICKER_SERVICE = "tusk-epp"
DEFAULT_PICKER_PORT: int = EndpointPickerConfig.model_fields["port"].default
# The pods requests go to: decode workers (role "both" without prefill workers).
POOL_COMPONENT = "decode"
REFRESH_S = 60.0  # how long a discovery answer is trusted
RETRY_S = 5.0  # after a discovery call that failed (no answer either way)


def picker_service() -> str:
    return os.environ.get(PICKER_SERVICE_ENV) or DEFAULT_PICKER_SERVICE


def pool_selector(owner: Owner) -> dict[str, str]:
    """Labels every decode worker pod of the ModelDeployment carries (desired.labels)."""
    return {"app.kubernetes.io/name": "tusk-worker", **selector_labels(owner, POOL_COMPONENT)}


def inference_pool(
    owner: Owner,
    picker: str | None = None,
    *,
    worker_http_port: int = HTTP_PORT,
    picker_port: int = DEFAULT_PICKER_PORT,
    fail_open: bool = False,
) -> dict[str, Any]:
    """The InferencePool of a ModelDeployment's decode workers. ``fail_open`` lets the Gateway
    route without the picker when it is down (GIE's FailOpen); the default, FailClose, refuses."""
    if not 0 < worker_http_port < 65536 or not 0 < picker_port < 65536:
        raise ValueError("ports must be in 1..65535")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": _metadata(
            owner, owner.name, labels(owner, "inference-pool", POOL_COMPONENT, "tusk", Defaults())
        ),
        "spec": {
            "selector": {"matchLabels": pool_selector(owner)},
            "targetPorts": [{"number": worker_http_port}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker or picker_service(),
                "port": {"number": picker_port},
                "failureMode": "FailOpen" if fail_open else "FailClose",
            },
        },
    }


def pool_ref(owner: Owner) -> dict[str, Any]:
    return {"kind": KIND, "metadata": {"name": owner.name, "namespace": owner.namespace}}


class _Discovery:
    """Whether one API server serves InferencePools, asked at most every ``REFRESH_S``."""

    def __init__(self) -> None:
        self.served = False
        self.next_check = 0.0

    async def served_now(self, kube: Kube) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return self.served
        try:
            found = await kube.call("GET", f"/apis/{API_VERSION}")
        except ApiError as exc:
            if exc.status != 404:  # no answer: keep the last one, ask again soon
                log.warning("discovery of %s failed, asking again in %ss: %s", API_VERSION, RETRY_S, exc)
                self.next_check = now + RETRY_S
                return self.served
            found = None
        served = any(r.get("name") == PLURAL for r in (found or {}).get("resources") or [])
        if served != self.served:
            log.info("%s InferencePools: %s", "creating" if served else "not creating", API_VERSION)
        self.served, self.next_check = served, now + REFRESH_S
        return served


_discoveries: weakref.WeakKeyDictionary[Kube, _Discovery] = weakref.WeakKeyDictionary()


async def served(kube: Kube) -> bool:
    """True when the API server behind ``kube`` serves ``inference.networking.k8s.io/v1`` pools."""
    discovery = _discoveries.get(kube)
    if discovery is None:
        discovery = _discoveries[kube] = _Discovery()
    return await discovery.served_now(kube)


async def desired(kube: Kube, owner: Owner) -> list[dict[str, Any]]:
    """The pool to apply with the other children: one, or none where the CRD is not installed."""
    return [inference_pool(owner)] if await served(kube) else []


async def delete(kube: Kube, owner: Owner) -> list[str]:
    """Delete the owner's pool (if the CRD is served and the pool is the owner's)."""
    if not await served(kube):
        return []
    return await apply.delete_children(kube, [pool_ref(owner)], owner.uid)

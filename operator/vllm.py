"""``spec.engine.name: vllm``: the decode workers run vLLM's OpenAI server instead of tusk.

The tusk children are built as usual and the decode Deployment and Service are then rewritten
for ``vllm serve``: the model and spec knobs become its arguments, KV events are published over
ZMQ (bound on a wildcard address, as vLLM requires, with the replay socket), the ports are
``http`` (the OpenAI API and /metrics, the InferencePool's target port), ``kv-events`` and
``kv-replay``, and the probes ask ``/health``. Everything else (labels, security contexts,
caches, model volumes, per-role pod fields) stays as for tusk workers, so the InferencePool and
the endpoint picker find these pods exactly as they find tusk's.

vLLM prefills for itself: a vLLM ModelDeployment has no prefill workers, no tusk kernel
backend, and a model vLLM can load by name or path (not ``tiny``, not a single GGUF file).
"""

from __future__ import annotations

import json
from typing import Any

from tusk.operator.desired import (
    HTTP_PORT,
    Owner,
    child_name,
    model_path,
    served_model_names,
)
from tusk.operator.spec import ModelDeploymentSpec

ENGINE = "vllm"
VLLM_VERSION = "v0.32.0"
# vLLM's published images per accelerator; others need spec.image (or decode.image).
IMAGES = {
    "nvidia": f"vllm/vllm-openai:{VLLM_VERSION}",
    "cpu": f"public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:{VLLM_VERSION}",
}
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558
# Container port names: the endpoint picker subscribes to a pod's events on them (router/epp/pods.py).
KV_EVENTS_PORT_NAME = "kv-events"
KV_REPLAY_PORT_NAME = "kv-replay"


def _model_args(spec: ModelDeploymentSpec) -> list[str]:
    source = spec.model
    if source.kind == "tiny" or source.source.endswith(".gguf"):
        raise ValueError(f"spec.model.source {source.source!r} cannot be served by engine.name vllm")
    if source.kind == "hf":
        name, _, revision = source.source[len("hf://") :].partition("@")
        return [name, *(["--revision", revision] if revision else [])]
    return [model_path(spec)]


def vllm_args(owner: Owner, spec: ModelDeploymentSpec) -> list[str]:
    """``vllm serve`` arguments for the spec (listening on every address of the pod)."""
    args = [*_model_args(spec), "--host", "0.0.0.0", "--port", str(HTTP_PORT)]
    args += ["--served-model-name", *served_model_names(owner, spec)]
    args += ["--block-size", str(spec.block_size), "--dtype", spec.dtype]
    if spec.tokenizer:
        args += ["--tokenizer", spec.tokenizer.removeprefix("hf://")]
    optional = {
        "--max-model-len": spec.max_model_len,
        "--max-num-seqs": spec.engine.max_num_seqs,
        "--max-num-batched-tokens": spec.engine.max_num_batched_tokens,
        "--gpu-memory-utilization": spec.engine.kv_cache_memory_fraction,
    }
    args += [part for flag, value in optional.items() if value is not None for part in (flag, str(value))]
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{KV_EVENTS_PORT}",
        "replay_endpoint": f"tcp://*:{KV_REPLAY_PORT}",
    }
    return [*args, "--kv-events-config", json.dumps(events, separators=(",", ":"))]


def vllm_image(spec: ModelDeploymentSpec) -> str:
    image = spec.decode.image or spec.image or IMAGES.get(spec.decode.accelerator)
    if image is None:
        raise ValueError(
            f"spec.image: engine.name vllm has no default image for accelerator {spec.decode.accelerator!r}"
        )
    return image


def _ports() -> list[dict[str, Any]]:
    return [
        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        {"name": KV_EVENTS_PORT_NAME, "containerPort": KV_EVENTS_PORT, "protocol": "TCP"},
        {"name": KV_REPLAY_PORT_NAME, "containerPort": KV_REPLAY_PORT, "protocol": "TCP"},
    ]


def _rewrite_deployment(deployment: dict[str, Any], owner: Owner, spec: ModelDeploymentSpec) -> None:
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "worker")
    health = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container.update(
        image=vllm_image(spec),
        command=["vllm", "serve"],
        args=vllm_args(owner, spec),
        ports=_ports(),
        startupProbe={**health, "failureThreshold": 180},
        readinessProbe=health,
        livenessProbe={**health, "failureThreshold": 6},
    )
    cache = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "cache")
    container["env"] = [
        *container["env"],
        {"name": "VLLM_CACHE_ROOT", "value": f"{cache}/vllm"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]


def apply_engine(
    owner: Owner, spec: ModelDeploymentSpec, children: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The children for the spec's engine: unchanged for tusk, rewritten decode workers for vLLM."""
    if spec.engine.name != ENGINE:
        return children
    if spec.prefill.replicas:
        raise ValueError("spec.prefill.replicas must be 0 with engine.name vllm (vLLM prefills itself)")
    if spec.engine.kernel_backend is not None:
        raise ValueError("spec.engine.kernelBackend is a tusk setting; remove it with engine.name vllm")
    decode = child_name(owner.name, "decode")
    for child in children:
        if child["metadata"]["name"] != decode:
            continue
        if child["kind"] == "Deployment":
            _rewrite_deployment(child, owner, spec)
        elif child["kind"] == "Service":
            child["spec"]["ports"] = [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"], "protocol": "TCP"}
                for p in _ports()
            ]
    return children

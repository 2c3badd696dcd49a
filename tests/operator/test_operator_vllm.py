"""``spec.engine.name: vllm``: decode workers run ``vllm serve`` with the spec's settings and KV
events, on the ports and labels the InferencePool and the endpoint picker use."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from pod_security import restricted_violations
from tusk.operator import inference_pool, vllm
from tusk.operator.desired import HTTP_PORT, Owner, desired_children
from tusk.operator.spec import InvalidSpec, parse_spec

OWNER = Owner("llama", "models", "uid-1")
SPEC = {
    "model": {"source": "hf://meta-llama/Llama-3.2-1B-Instruct@abc123", "tokenSecretRef": {"name": "hf"}},
    "servedModelNames": ["llama", "l3"],
    "dtype": "bfloat16",
    "maxModelLen": 4096,
    "blockSize": 32,
    "engine": {"name": "vllm", "maxNumSeqs": 64, "kvCacheMemoryFraction": 0.8},
    "decode": {"replicas": 2, "accelerator": "nvidia"},
}


def _objects(raw: dict) -> dict:
    return {(c["kind"], c["metadata"]["name"]): c for c in desired_children(OWNER, parse_spec(raw))}


def _flag(args: list[str], flag: str) -> list[str]:
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_decode_workers_run_vllm_serve_with_the_specs_settings() -> None:
    objects = _objects(SPEC)
    deployment = objects["Deployment", "llama-decode"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == vllm.IMAGES["nvidia"]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[0] == "meta-llama/Llama-3.2-1B-Instruct" and _flag(args, "--revision") == ["abc123"]
    assert _flag(args, "--served-model-name") == ["llama", "l3"]
    assert _flag(args, "--port") == [str(HTTP_PORT)] and _flag(args, "--host") == ["0.0.0.0"]
    assert _flag(args, "--block-size") == ["32"] and _flag(args, "--dtype") == ["bfloat16"]
    assert _flag(args, "--max-model-len") == ["4096"] and _flag(args, "--max-num-seqs") == ["64"]
    assert _flag(args, "--gpu-memory-utilization") == ["0.8"]
    assert "--max-num-batched-tokens" not in args
    # vLLM binds its PUB socket only on a wildcard address; the replay socket repairs gaps.
    events = json.loads(_flag(args, "--kv-events-config")[0])
    assert events == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{vllm.KV_EVENTS_PORT}",
        "replay_endpoint": f"tcp://*:{vllm.KV_REPLAY_PORT}",
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "kv-events": vllm.KV_EVENTS_PORT, "kv-replay": vllm.KV_REPLAY_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_CACHE_ROOT"]["value"].startswith("/var/cache/tusk") and "HF_TOKEN" in env
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Still a valid, restricted pod; the Service exposes the same ports.
    for child in objects.values():
        kubernetes_validate.validate(child, "1.33", strict=True)
    assert restricted_violations(template) == []
    service = objects["Service", "llama-decode"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    # The InferencePool selects these pods and targets their OpenAI port.
    pool = inference_pool.inference_pool(OWNER)
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pool["spec"]["targetPorts"] == [{"number": ports["http"]}]


def test_images_paths_and_the_tusk_default() -> None:
    cpu = {**SPEC, "decode": {"replicas": 1}, "model": {"source": "pvc://weights/llama"}}
    container = _objects(cpu)["Deployment", "llama-decode"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == vllm.IMAGES["cpu"] and container["args"][0] == "/models/llama"
    custom = {**cpu, "image": "registry.local/vllm:1"}
    assert (
        _objects(custom)["Deployment", "llama-decode"]["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.local/vllm:1"
    )
    tusk = _objects({"model": {"source": "tiny"}})["Deployment", "llama-decode"]
    assert tusk["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["tusk", "worker"]
    assert parse_spec({"model": {"source": "tiny"}}).engine.name == "tusk"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prefill": {"replicas": 1}}, "spec.prefill.replicas must be 0"),
        ({"model": {"source": "tiny"}}, "cannot be served by engine.name vllm"),
        ({"model": {"source": "hf://org/repo/model.Q4_K_M.gguf"}}, "cannot be served by engine.name vllm"),
        ({"decode": {"accelerator": "amd"}}, "no default image for accelerator 'amd'"),
        ({"engine": {"name": "vllm", "kernelBackend": "torch"}}, "kernelBackend"),
    ],
)
def test_what_vllm_cannot_run_is_refused_with_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        desired_children(OWNER, parse_spec({**SPEC, **change}))


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="spec.engine.name"):
        parse_spec({**SPEC, "engine": {"name": "sglang"}})

"""The InferencePool builder follows inference.networking.k8s.io/v1."""

from __future__ import annotations

import pytest
from tusk.router.epp.inference_pool import inference_pool


def test_inference_pool_selects_the_models_workers_and_names_the_picker() -> None:
    pool = inference_pool("chat", "prod", "chat", "chat-epp", worker_http_port=8080)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    spec = pool["spec"]
    assert spec["selector"]["matchLabels"]["tusk.dev/model"] == "chat"
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tusk-worker"
    assert spec["targetPorts"] == [{"number": 8080}]
    assert spec["endpointPickerRef"] == {
        "kind": "Service",
        "name": "chat-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    assert (
        inference_pool("a", "b", "a", "e", fail_open=True)["spec"]["endpointPickerRef"]["failureMode"]
        == "FailOpen"
    )
    with pytest.raises(ValueError):
        inference_pool("a", "b", "a", "e", picker_port=0)

"""Bad requests get the right 4xx with an OpenAI error body, never a 500 or a silent default."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({"model": MODEL, "messages": MSG, "max_tokens": "ten"}, "max_tokens", "invalid_value"),
        ({"model": MODEL, "messages": "hi"}, "messages", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "stream": "yes"}, "stream", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "frobnicate": 1}, "frobnicate", "unknown_field"),
        ({"model": MODEL}, "messages", "missing_required_parameter"),
        ({"model": MODEL, "messages": MSG, "n": 17}, "n", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        (
            {"model": MODEL, "messages": MSG, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "invalid_value",
        ),
        ({"model": MODEL, "messages": MSG, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"model": MODEL, "messages": MSG, "min_p": -0.1}, "min_p", "invalid_value"),
        (
            {"model": MODEL, "messages": MSG, "min_tokens": 5, "max_completion_tokens": 4},
            "min_tokens",
            "unsupported_parameter",
        ),
        ({"model": MODEL, "messages": MSG, "logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
        ({"model": MODEL, "messages": MSG, "best_of": 2}, "best_of", "unsupported_parameter"),
        (
            {"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            {"model": MODEL, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "unsupported_parameter",
        ),
        (
            {"model": MODEL, "messages": MSG, "stream_options": {"include_usage": True}},
            "stream_options",
            "unsupported_parameter",
        ),
        (
            {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.role",
            "invalid_value",
        ),
    ],
)
def test_invalid_fields_are_400(two_worker_router, payload, param, code) -> None:
    _, workers, url = two_worker_router
    err = _error(httpx.post(f"{url}{CHAT}", json=payload), 400)
    assert err["param"] == param
    assert err["code"] == code
    assert err["type"] == "invalid_request_error"
    assert not any(w.s.generate_calls for w in workers)


def test_non_finite_sampling_values_are_400(two_worker_router) -> None:
    _, workers, url = two_worker_router
    for field in ("temperature", "top_p", "min_p", "frequency_penalty", "repetition_penalty"):
        for value in ("NaN", "Infinity", "-Infinity"):
            raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "{field}": {value}}}'
            resp = httpx.post(
                f"{url}{CHAT}", content=raw.encode(), headers={"content-type": "application/json"}
            )
            err = _error(resp, 400)
            assert err["param"] == field and err["code"] == "invalid_value", (field, value)
    assert not any(w.s.generate_calls for w in workers)


def test_malformed_json_and_non_object(two_worker_router) -> None:
    _, _, url = two_worker_router
    headers = {"content-type": "application/json"}
    assert (
        _error(httpx.post(f"{url}{CHAT}", content=b'{"model": ', headers=headers), 400)["code"]
        == "invalid_json"
    )
    assert (
        _error(httpx.post(f"{url}{CHAT}", content=b"[1, 2]", headers=headers), 400)["code"] == "invalid_json"
    )


def test_unknown_model_is_404(two_worker_router) -> None:
    _, _, url = two_worker_router
    err = _error(httpx.post(f"{url}{CHAT}", json={"model": "gpt-9", "messages": MSG}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MSG)


def test_huge_body_is_413(harness) -> None:
    _, endpoint = harness.worker()
    _, url = harness.router([endpoint], max_body_bytes=4096)
    big = {"model": MODEL, "prompt": "x" * 10_000}
    assert _error(httpx.post(f"{url}/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no content-length: the limit applies while reading
        for _ in range(10):
            yield b"x" * 1000

    assert httpx.post(f"{url}/v1/completions", content=chunks()).status_code == 413


def test_prompt_longer_than_context_is_400(two_worker_router) -> None:
    _, _, url = two_worker_router
    err = _error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "word " * 5000}), 400)
    assert err["code"] == "context_length_exceeded"
    ids = {"model": MODEL, "prompt": [1, 2, 10**9]}
    assert _error(httpx.post(f"{url}/v1/completions", json=ids), 400)["param"] == "prompt"


def test_worker_invalid_argument_becomes_400(harness) -> None:
    _, endpoint = harness.worker(reject_longer_than=3)
    _, url = harness.router([endpoint])
    err = _error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a b c d e f g"}), 400)
    assert "longer than 3" in err["message"]
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "a b c d e f g", "stream": True}
    ) as resp:
        assert resp.status_code == 400  # failures before the first token are HTTP errors, not SSE


def test_unknown_policy_header_is_400(two_worker_router) -> None:
    _, _, url = two_worker_router
    resp = httpx.post(
        f"{url}{CHAT}", json={"model": MODEL, "messages": MSG}, headers={"x-tusk-policy": "magic"}
    )
    assert _error(resp, 400)["param"] == "x-tusk-policy"


def test_unknown_path_and_method(two_worker_router) -> None:
    _, _, url = two_worker_router
    _error(httpx.get(f"{url}/v1/nothing"), 404)
    _error(httpx.get(f"{url}{CHAT}"), 405)


def test_api_keys(harness, monkeypatch, tmp_path) -> None:
    secret = tmp_path / "keys"
    secret.write_text("from-secret\n")
    monkeypatch.setenv("TUSK_API_KEYS", "from-env")
    monkeypatch.setenv("TUSK_API_KEYS_FILE", str(secret))
    _, endpoint = harness.worker()
    _, url = harness.router([endpoint], api_keys=["from-config"])
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert _error(httpx.post(f"{url}/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": "Bearer nope"})
    assert _error(wrong, 401)["code"] == "invalid_api_key"
    for key in ("from-config", "from-env", "from-secret"):
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200, key
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()

"""The OpenAI surface through real clients: the official SDK (sync, async, streaming) and raw
HTTP for the edges the SDK never sends."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MODEL, REPLY


def test_openai_sync_chat_and_completion(two_worker_router) -> None:
    _, workers, url = two_worker_router
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == REPLY
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.completion_tokens == len(workers[0].s.script)
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 3
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    # round robin spread the two requests over both workers
    assert len(workers[0].s.generate_calls) == 1 and len(workers[1].s.generate_calls) == 1


async def test_openai_async_streaming_with_usage(two_worker_router) -> None:
    _, _, url = two_worker_router
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == REPLY
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters never split
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0
    await client.close()


def test_sync_streaming_completion_ends_with_done(two_worker_router) -> None:
    _, _, url = two_worker_router
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_request_id_header_is_honoured_or_made(two_worker_router) -> None:
    _, workers, url = two_worker_router
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    mine = httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    again = httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "abc-123"})
    assert again.headers["x-request-id"] == "abc-123"
    ids = [c.request_id for w in workers for c in w.s.generate_calls]
    assert len(set(ids)) == 2 and all(i.startswith("abc-123-") for i in ids)  # unique on the workers
    made = httpx.post(f"{url}/v1/completions", json=body)
    assert made.headers["x-request-id"].startswith("req-")
    bad = httpx.post(
        f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"x-request-id": "r1"}
    )
    assert bad.status_code == 404 and bad.headers["x-request-id"] == "r1"


def test_sampling_fields_reach_the_worker(two_worker_router) -> None:
    _, workers, url = two_worker_router
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "max_completion_tokens": 4,
        "user": "alice",
    }
    resp = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    call = next(c for w in workers for c in w.s.generate_calls)
    assert call.sampling.max_tokens == 4
    assert call.sampling.seed == 7
    assert call.sampling.temperature == pytest.approx(0.5)
    assert call.sampling.top_p == pytest.approx(0.9)
    assert 100265 in call.sampling.stop_token_ids  # <|im_end|> from the tokenizer config
    assert call.request_id == resp.headers["x-request-id"]


def test_health_and_metrics(two_worker_router) -> None:
    _, _, url = two_worker_router
    httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200
    assert health.json()["models"][MODEL]["ready_workers"] == 2
    text = httpx.get(f"{url}/metrics").text
    assert 'tusk_router_requests_total{endpoint="/v1/completions",model="tiny",status="200"} 1.0' in text
    assert "tusk_router_ttft_seconds_bucket" in text
    assert "tusk_router_routing_decisions_total" in text
    assert "tusk_router_worker_healthy" in text

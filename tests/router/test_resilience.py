"""Failing workers, full queues and vanishing clients: the router degrades cleanly."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL, REPLY

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_worker_failing_before_first_token_is_retried_elsewhere(harness) -> None:
    bad, eb = harness.worker(fail_before_first=True)
    good, eg = harness.worker()
    _, url = harness.router([eb, eg])  # round robin: some requests land on `bad` first
    for _ in range(4):
        resp = httpx.post(f"{url}/v1/chat/completions", json=BODY)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == REPLY
    assert bad.s.generate_calls, "the failing worker was never tried"
    assert len(good.s.generate_calls) == 4
    assert "tusk_router_worker_retries_total" in httpx.get(f"{url}/metrics").text


def test_worker_killed_before_request_is_skipped(harness) -> None:
    dead, ed = harness.worker()
    good, eg = harness.worker()
    _, url = harness.router([ed, eg])
    harness.kill(dead)  # the router has not noticed yet: the request itself finds out
    for _ in range(3):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = [ln for ln in resp.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in ln for ln in lines)


def test_worker_killed_mid_stream_gives_clean_error_event(harness) -> None:
    _, endpoint = harness.worker(die_after_tokens=3)
    _, url = harness.router([endpoint])
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}, timeout=20
    ) as resp:
        assert resp.status_code == 200
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "mid-stream" in lines[-2]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):  # the SDK surfaces the error event as an exception
        for _ in client.chat.completions.create(**BODY, stream=True):
            pass


def test_no_ready_worker_is_503(harness) -> None:
    worker, endpoint = harness.worker()
    harness.kill(worker)
    _, url = harness.router([endpoint], wait_ready=False)
    time.sleep(0.3)
    resp = httpx.post(f"{url}/v1/chat/completions", json=BODY)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_ready_worker"
    assert httpx.get(f"{url}/health").status_code == 503
    assert httpx.get(f"{url}/health/live").status_code == 200


def test_full_queue_is_429_with_retry_after(harness) -> None:
    _, endpoint = harness.worker(token_delay_s=0.2)
    router, url = harness.router([endpoint], max_queue=2)
    results: list[int] = []

    def slow() -> None:
        results.append(
            httpx.post(
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=20
            ).status_code
        )

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    _wait(lambda: router.api.inflight == 2)
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    for t in threads:
        t.join()
    assert results == [200, 200]
    ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200  # slots were released


async def test_client_disconnect_cancels_worker_request(harness) -> None:
    worker, endpoint = harness.worker(token_delay_s=0.05, script=harness.script("word " * 200))
    router, url = harness.router([endpoint])
    body = {"model": MODEL, "prompt": "x", "stream": True}
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                break  # read one token, then hang up
    for _ in range(100):
        if worker.s.cancels and worker.s.aborted_streams:
            break
        await asyncio.sleep(0.05)
    assert worker.s.cancels == [worker.s.generate_calls[0].request_id]
    assert worker.s.aborted_streams == 1
    assert router.api.inflight == 0
    assert all(c.state.inflight == 0 for c in router.registry.get(MODEL).clients.values())


def test_deadline_turns_into_504(harness) -> None:
    _, endpoint = harness.worker(token_delay_s=0.5)
    _, url = harness.router([endpoint], request_timeout_s=0.3)
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5})
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "timeout"


def test_graceful_shutdown_finishes_inflight_streams(harness) -> None:
    import signal

    _, endpoint = harness.worker(token_delay_s=0.03)
    router, url = harness.router([endpoint])
    server = next(s for s, r in harness._servers if r is router)
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}, timeout=20
        ) as r:
            lines.extend(ln for ln in r.iter_lines() if ln)

    t = threading.Thread(target=stream)
    t.start()
    _wait(lambda: router.api.inflight == 1)  # the stream is running

    async def sigterm() -> None:
        server.handle_exit(signal.SIGTERM, None)

    harness.run(sigterm())
    t.join(20)
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in ln for ln in lines)
    assert router.api.draining
    with pytest.raises(httpx.HTTPError):  # no new connections after the drain started
        httpx.get(f"{url}/health", timeout=2)


def test_client_giving_up_on_a_non_streamed_request_cancels_it(harness) -> None:
    worker, endpoint = harness.worker(token_delay_s=0.05, script=harness.script("word " * 200))
    router, url = harness.router([endpoint])
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=0.5)
    _wait(lambda: worker.s.cancels and worker.s.aborted_streams == 1)
    assert worker.s.cancels == [worker.s.generate_calls[0].request_id]
    _wait(lambda: router.api.inflight == 0)


def test_greedy_request_continues_on_another_worker_after_a_mid_stream_crash(harness) -> None:
    dying, ed = harness.worker(die_after_tokens=3, continue_script=True)
    good, eg = harness.worker(continue_script=True)
    _, url = harness.router([ed, eg])  # round robin sends the first request to `dying`
    body = {**BODY, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    text, usage = "", None
    for chunk in client.chat.completions.create(**body):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == REPLY  # one uninterrupted answer
    assert dying.s.generate_calls and len(good.s.generate_calls) == 1
    moved = good.s.generate_calls[0]
    original = list(dying.s.generate_calls[0].prompt_token_ids)
    assert list(moved.prompt_token_ids) == original + dying.s.script[:3]
    assert moved.sampling.max_tokens == dying.s.generate_calls[0].sampling.max_tokens - 3
    assert usage.completion_tokens == len(good.s.script)


def _total_calls(workers) -> int:
    return sum(len(w.s.generate_calls) + len(w.s.prefill_calls) for w in workers)


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"])
def test_a_request_the_worker_rejects_is_not_retried_elsewhere(harness, code) -> None:
    import grpc

    workers = [
        harness.worker(reject_longer_than=0, reject_code=getattr(grpc.StatusCode, code)) for _ in range(3)
    ]
    _, url = harness.router([e for _, e in workers])
    resp = httpx.post(f"{url}/v1/chat/completions", json=BODY)
    assert resp.status_code == 400, resp.text
    assert "longer than" in resp.json()["error"]["message"]
    assert _total_calls([w for w, _ in workers]) == 1


def test_an_engine_error_is_not_retried_elsewhere(harness) -> None:
    import grpc

    workers = [harness.worker(reject_longer_than=0, reject_code=grpc.StatusCode.INTERNAL) for _ in range(3)]
    _, url = harness.router([e for _, e in workers])
    resp = httpx.post(f"{url}/v1/chat/completions", json=BODY)
    assert resp.status_code == 502, resp.text
    assert _total_calls([w for w, _ in workers]) == 1


def test_a_poison_request_takes_out_at_most_one_more_worker(harness) -> None:
    """Every worker dies while running the request: the first crash may be a coincidence and is
    retried once; the second ends the request, so the third worker never sees it."""
    workers = [harness.worker(die_after_tokens=0) for _ in range(3)]
    _, url = harness.router([e for _, e in workers])
    resp = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=30)
    assert resp.status_code == 502, resp.text
    assert "not trying another" in resp.json()["error"]["message"]
    assert sorted(len(w.s.generate_calls) for w, _ in workers) == [0, 1, 1]


def test_nothing_after_a_finish_reason_reaches_the_client(harness) -> None:
    _, endpoint = harness.worker(after_finish=harness.script(" and more"))
    _, url = harness.router([endpoint])
    resp = httpx.post(f"{url}/v1/chat/completions", json=BODY)
    assert resp.json()["choices"][0]["message"]["content"] == REPLY
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    text = "".join(
        c["delta"].get("content") or "" for ln in lines[:-1] for c in json.loads(ln[6:])["choices"]
    )
    assert text == REPLY and lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("disaggregated", [False, True], ids=["aggregated", "prefill-worker"])
def test_a_stream_abandoned_before_its_first_token_cancels_the_worker_at_once(harness, disaggregated) -> None:
    """The first token would take 30 s; the client gives up after half a second, and the worker
    hears of it right then, not when the token finally comes."""
    if disaggregated:
        slow, ep = harness.worker(role="prefill", prefill_delay_s=30)
        _, ed = harness.worker(role="decode")
        endpoints = [ep, ed]
    else:
        slow, ed = harness.worker(token_delay_s=30)
        endpoints = [ed]
    router, url = harness.router(endpoints)
    body = {**BODY, "stream": True}
    with (
        pytest.raises(httpx.TimeoutException),
        httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=0.5),
    ):
        pass
    calls = slow.s.prefill_calls if disaggregated else slow.s.generate_calls
    _wait(lambda: slow.s.cancels, timeout=10)
    assert slow.s.cancels == [calls[0].request_id]
    _wait(lambda: router.api.inflight == 0)
    assert all(c.state.inflight == 0 for c in router.registry.get(MODEL).clients.values())


def test_health_is_not_ready_with_only_a_prefill_worker_left(harness) -> None:
    _, ep = harness.worker(role="prefill")
    decode, ed = harness.worker(role="decode")
    router, url = harness.router([ep, ed])
    assert httpx.get(f"{url}/health").json()["models"][MODEL]["can_serve"] is True
    harness.kill(decode)
    _wait(lambda: httpx.get(f"{url}/health").status_code == 503)
    body = httpx.get(f"{url}/health").json()
    assert body["models"][MODEL] == {"ready_workers": 1, "can_serve": False}
    assert httpx.post(f"{url}/v1/chat/completions", json=BODY).status_code == 503

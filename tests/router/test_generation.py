"""What the request path does with tokens: disaggregated prefill -> decode, stop strings,
multi-byte characters, KV events feeding the prefix index."""

from __future__ import annotations

import time

import httpx
import openai
from conftest import MODEL, REPLY

from tusk.config import RoutingConfig
from tusk.hashing import block_hashes


def test_disaggregated_prefill_then_decode_with_first_token(harness) -> None:
    prefill, ep = harness.worker(role="prefill")
    decode, ed = harness.worker(role="decode")
    router, url = harness.router([ep, ed])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == REPLY
    assert len(prefill.s.prefill_calls) == 1 and not prefill.s.generate_calls
    (gen,) = decode.s.generate_calls
    assert gen.HasField("first_token") and gen.first_token == decode.s.script[0]
    assert list(gen.prompt_token_ids) == list(prefill.s.prefill_calls[0].prompt_token_ids)
    assert gen.request_id == prefill.s.prefill_calls[0].request_id
    assert usage.completion_tokens == len(decode.s.script)
    assert 'disaggregated="true"' in httpx.get(f"{url}/metrics").text


def test_disaggregated_decode_failure_before_first_message_moves_on(harness) -> None:
    _, ep = harness.worker(role="prefill")
    bad, eb = harness.worker(role="decode", fail_before_first=True)
    good, eg = harness.worker(role="decode")
    _, url = harness.router([ep, eb, eg])
    for _ in range(2):
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == REPLY
    assert bad.s.generate_calls and all(c.HasField("first_token") for c in good.s.generate_calls)


def test_one_token_request_needs_no_decode_worker(harness) -> None:
    _, ep = harness.worker(role="prefill")
    decode, ed = harness.worker(role="decode")
    _, url = harness.router([ep, ed])
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    assert resp.json()["usage"]["completion_tokens"] == 1
    assert not decode.s.generate_calls


def test_stop_string_truncates_and_cancels(harness) -> None:
    worker, endpoint = harness.worker(token_delay_s=0.01)
    _, url = harness.router([endpoint])
    body = {"model": MODEL, "prompt": "x", "stop": ["🦀"]}
    resp = httpx.post(f"{url}/v1/completions", json=body)
    choice = resp.json()["choices"][0]
    assert choice["text"] == REPLY.split("🦀")[0]
    assert choice["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stop": "tusk", "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    texts = [httpx.Response(200, content=ln[6:]).json()["choices"][0]["text"] for ln in lines]
    assert "".join(texts) == REPLY.split("tusk")[0]
    assert "tus" not in "".join(texts)  # the held-back partial match never leaked
    deadline = time.monotonic() + 5
    while len(worker.s.cancels) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(worker.s.cancels) == 2  # the worker stopped generating past the stop string


def test_multibyte_text_survives_token_by_token_streaming(harness) -> None:
    text = "naïve café — 日本語のテキスト 🦀🚀 ok"
    _, endpoint = harness.worker(script=harness.script(text), chunk_size=1)
    _, url = harness.router([endpoint])
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}
    ) as r:
        pieces = [
            httpx.Response(200, content=ln[6:]).json()["choices"][0]["text"]
            for ln in r.iter_lines()
            if ln.startswith("data: {")
        ]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_kv_events_feed_the_prefix_index(harness) -> None:
    _, endpoint = harness.worker()
    router, url = harness.router([endpoint], routing=RoutingConfig(policy="cache_aware", kv_events=True))
    prompt = "shared system prompt " * 20
    assert (
        httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}
        ).status_code
        == 200
    )
    runtime = router.registry.get(MODEL)
    hashes = block_hashes(runtime.tokenizer.encode(prompt, add_special_tokens=True), runtime.block_size)
    deadline = time.monotonic() + 5
    while not runtime.index.match(hashes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.index.match(hashes) == {"w0": len(hashes)}


def test_policy_header_overrides_the_default(harness) -> None:
    a, ea = harness.worker()
    b, eb = harness.worker()
    _, url = harness.router([ea, eb], policy="round_robin")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for _ in range(4):
        headers = {"x-tusk-policy": "session", "x-tusk-session": "alice"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=headers).status_code == 200
    assert sorted([len(a.s.generate_calls), len(b.s.generate_calls)]) == [0, 4]  # sticky


def test_bytes_that_never_complete_a_character_are_flushed_at_the_end(harness) -> None:
    ids = harness.script("ok 🦀")
    script = ids[:-1] + ids[-1:] + ids[-2:-1]  # ends with the crab's first byte token alone
    _, endpoint = harness.worker(script=script)
    _, url = harness.router([endpoint])
    body = {"model": MODEL, "prompt": "x"}
    text = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
    assert text == harness.tokenizer.decode(script) and text.endswith("\ufffd")
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        pieces = [
            httpx.Response(200, content=ln[6:]).json()["choices"][0]["text"]
            for ln in r.iter_lines()
            if ln.startswith("data: {")
        ]
    assert "".join(pieces) == text


def test_a_gap_in_kv_event_sequence_resubscribes(harness) -> None:
    from tusk.protocol import pb

    worker, endpoint = harness.worker()
    router, _ = harness.router([endpoint], routing=RoutingConfig(policy="cache_aware", kv_events=True))
    runtime = router.registry.get(MODEL)

    def batch(seq: int, h: int) -> pb.KvEventBatch:
        event = pb.KvEvent(kind=pb.KvEvent.KIND_STORED, medium=pb.KV_MEDIUM_DEVICE, block_hashes=[h])
        return pb.KvEventBatch(worker_id="w0", sequence=seq, events=[event])

    async def push(*batches: pb.KvEventBatch) -> None:
        for b in batches:
            worker.s.kv_queue.put_nowait(b)

    deadline = time.monotonic() + 5
    while worker.s.subscriptions < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    harness.run(push(batch(1, 111), batch(2, 222), batch(4, 444)))
    while worker.s.subscriptions < 2:
        assert time.monotonic() < deadline, "router never resubscribed after the gap"
        time.sleep(0.02)
    assert runtime.index.match([111]) == {"w0": 1} and runtime.index.match([222]) == {"w0": 1}
    assert runtime.index.match([444]) == {}  # the batch after the gap was not trusted


def test_every_policy_serves_aggregated_and_disaggregated(harness) -> None:
    from tusk.router.policies import POLICY_NAMES

    _, e_both = harness.worker()
    _, e_prefill = harness.worker(role="prefill")
    _, e_decode = harness.worker(role="decode")
    _, agg = harness.router([e_both])
    _, dis = harness.router([e_prefill, e_decode])
    body = {"model": MODEL, "prompt": "policy check " * 10, "max_tokens": 4, "user": "u1"}
    for policy in POLICY_NAMES:
        for url in (agg, dis):
            resp = httpx.post(f"{url}/v1/completions", json=body, headers={"x-tusk-policy": policy})
            assert resp.status_code == 200, (policy, url, resp.text)
            assert resp.json()["usage"]["completion_tokens"] == 4
    decisions = httpx.get(f"{dis}/metrics").text
    assert decisions.count("tusk_router_routing_decisions_total{") >= len(POLICY_NAMES)


def test_prefill_token_reaches_the_client_before_decode_answers(harness) -> None:
    script = harness.script()
    _, ep = harness.worker(role="prefill", script=script)
    _, ed = harness.worker(role="decode", script=script, token_delay_s=2.0, chunk_size=len(script))
    _, url = harness.router([ep, ed])
    started = time.monotonic()
    first_at = None
    pieces = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text = httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
                if text and first_at is None:
                    first_at = time.monotonic() - started
                pieces.append(text)
    total = time.monotonic() - started
    assert "".join(pieces) == REPLY
    assert first_at is not None and first_at < 1.5 and total >= 2.0  # streamed at once, not after decode

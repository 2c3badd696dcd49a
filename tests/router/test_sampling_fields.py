"""The request fields users and benchmark clients send, through the router to a real worker (the
tiny model): n > 1 (indexed choices, streamed and not, usage summed), logprobs in both wire
formats, and vLLM's extensions (ignore_eos, min_tokens, top_k, min_p, repetition_penalty)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import MODEL, REPLY

from tusk.config import EngineConfig, KVTierConfig, WorkerConfig, WorkerEndpoint

MSG = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def url(harness, tiny_model):
    from tusk.worker.server import Worker

    config = WorkerConfig(
        model=str(tiny_model),
        engine=EngineConfig(num_kv_blocks=256, block_size=16, max_num_seqs=16),
        kv_tier=KVTierConfig(host_cache_blocks=0),
    )
    worker = Worker(config)
    address = harness.run(worker.start(), timeout=120)
    try:
        _, router_url = harness.router([WorkerEndpoint(address=address)])
        yield router_url
    finally:
        harness.run(worker.stop(drain_timeout=0), timeout=60)


def _sse(resp: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_n_choices_seeded_streamed_and_not(url) -> None:
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 11}
    body["ignore_eos"] = True
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in whole["choices"]]
    assert len(set(texts)) > 1  # child i is seeded with seed + i, so the choices differ
    assert whole["usage"]["completion_tokens"] == 18
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 18

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _sse(httpx.post(f"{url}/v1/completions", json=streamed, timeout=60))
    pieces, finishes = ["", "", ""], {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        pieces[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert pieces == texts  # same seeds, same tokens
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 18


def test_greedy_n_gives_identical_choices_through_the_sdk(url) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=MSG,
        n=2,
        temperature=0,
        max_completion_tokens=5,
        extra_body={
            "ignore_eos": True,
            "min_tokens": 5,
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
        },
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content
    assert chat.usage.completion_tokens == 10


def test_chat_logprobs_streamed_and_not(url) -> None:
    body = {"model": MODEL, "messages": MSG, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body |= {"logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"]
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == pytest.approx(entry["logprob"])
    chunks = _sse(httpx.post(f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60))
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == content
    plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": 0})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_completion_logprobs_legacy_format(url) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once",
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
        "top_k": -1,  # vLLM's "off"
    }
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(top) <= 1 for top in lp["top_logprobs"])


def test_stop_strings_wait_for_min_tokens(harness) -> None:
    """As vLLM: a stop string in the first min_tokens outputs does not end the request."""
    _, endpoint = harness.worker(chunk_size=1)
    _, fake_url = harness.router([endpoint])
    body = {"model": MODEL, "prompt": "x", "stop": ["tusk"]}
    cut = httpx.post(f"{fake_url}/v1/completions", json=body).json()["choices"][0]
    assert cut["text"] == REPLY[: REPLY.index("tusk")] and cut["finish_reason"] == "stop"
    late = httpx.post(f"{fake_url}/v1/completions", json=body | {"min_tokens": 6}).json()["choices"][0]
    assert late["text"] == REPLY and late["finish_reason"] == "stop"  # "tusk" came within 6 tokens

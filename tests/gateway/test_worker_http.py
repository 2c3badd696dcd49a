"""OpenAI HTTP on a worker: same tokens as gRPC on the same engine, vLLM-style extras, metrics."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import openai
from tusk.router.tokenizer import ModelTokenizer
from tusk.worker.server import Worker

from tusk.config import EngineConfig, WorkerConfig
from tusk.protocol import pb, rpc


async def _grpc_tokens(address: str, prompt: list[int], n: int) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.WorkerStub(channel)
        request = pb.GenerateRequest(
            request_id="grpc-1",
            prompt_token_ids=prompt,
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
        )
        return [t for reply in [r async for r in stub.Generate(request)] for t in reply.token_ids]


async def test_http_api_matches_grpc_and_serves_vllm_extras(tiny_model: Path) -> None:
    config = WorkerConfig(
        model=str(tiny_model),
        served_model_name="tiny",
        http_port=0,
        engine=EngineConfig(num_kv_blocks=64, block_size=4, max_num_seqs=4),
    )
    worker = Worker(config)
    await worker.start()
    try:
        assert worker.http_address
        base = f"http://{worker.http_address}"
        tok = ModelTokenizer.from_dir(tiny_model)
        prompt = tok.encode("The tusk worker speaks HTTP too", add_special_tokens=True)
        expected = await _grpc_tokens(worker.address, prompt, 12)
        assert len(expected) == 12

        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        done = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].text == tok.decode(expected)
        assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == len(prompt)

        streamed = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join([c.choices[0].text async for c in streamed if c.choices]) == tok.decode(expected)

        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            assert (await http.get("/health")).status_code == 200
            r = await http.post("/tokenize", json={"model": "tiny", "prompt": "hello world"})
            ids = r.json()["tokens"]
            assert r.json()["count"] == len(ids) and ids == tok.encode("hello world", add_special_tokens=True)
            r = await http.post("/detokenize", json={"model": "tiny", "tokens": expected})
            assert r.json()["prompt"] == tok.decode(expected)
            r = await http.post(
                "/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
            )
            assert r.status_code == 200 and r.json()["count"] > 0
            bad = await http.post("/detokenize", json={"tokens": [-1]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
            bad = await http.post("/tokenize", content=b"not json")
            assert bad.status_code == 400
            bad = await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
            assert bad.status_code == 404
            metrics = (await http.get("/metrics")).text
            for name in (
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
                "vllm:gpu_cache_usage_perc",
                "tusk_worker_generated_tokens_total",
            ):
                assert name in metrics, name
            assert 'vllm:cache_config_info{block_size="4",num_gpu_blocks="64"} 1.0' in metrics
    finally:
        await worker.stop(drain_timeout=1)

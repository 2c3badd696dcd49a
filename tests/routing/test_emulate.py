"""``tusk emulate``: the simulator's worker model behind the real worker protocol and an OpenAI
HTTP API, and the simulator agreeing with a live replay through the real router process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
from tusk.router import loadgen
from tusk.router.sim.cluster import SimConfig, Simulator
from tusk.router.sim.profile import WorkerProfile, load_profile
from tusk.router.sim.realtime import EmulatedEngine
from tusk.router.sim.trace import load_trace
from tusk.router.workload import trace_items

from tusk import emulate
from tusk.config import AdmissionConfig, Role
from tusk.protocol import pb, rpc

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "mooncake_synthetic_tail400.jsonl"


def test_impossible_profiles_are_refused_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="prefill_tokens_per_s must be > 0.*chunk_tokens must be > 0"):
        WorkerProfile(prefill_tokens_per_s=0, chunk_tokens=0).validate()
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"kv_capacity_tokens": -5, "decode_s_per_seq": 1e-5}))
    assert emulate.main(["--profile", str(bad)]) == 2
    assert "kv_capacity_tokens must be > 0" in capsys.readouterr().err
    for name in ("h100-llama8b", "cpu-tusk-tiny"):
        load_profile(name).scaled(8).validate()


async def _drain(live) -> list[tuple[str, int | None]]:
    events = []
    while True:
        kind, value = await asyncio.wait_for(live.events.get(), 30)
        events.append((kind, value))
        if kind == "done":
            return events


async def test_engine_streams_caches_emits_events_and_reports_running_prefills() -> None:
    # fast-forward: 50 emulated seconds per wall second
    engine = EmulatedEngine("e0", Role.BOTH, WorkerProfile(), 16, time_scale=50.0, stream_interval_s=0.01)
    stored: list[int] = []
    engine.listeners.append(lambda s, r: stored.extend(s))
    engine.start()
    prompt = list(range(1000, 1200))
    events = await _drain(engine.submit("a", prompt, 40))
    assert events[0] == ("first", None) and events[-1] == ("done", None)
    assert 1 + sum(v for k, v in events if k == "tokens") == 40
    assert len(stored) == 200 // 16
    again = engine.submit("b", prompt + [7] * 50, 3)
    assert again.cached_tokens == 192  # 12 full blocks were already there
    await _drain(again)
    # a long prefill in progress: the report counts its remainder and the running sequence
    long = engine.submit("c", list(range(5000, 5000 + 200_000)), 2)
    await asyncio.sleep(0.01)
    report = engine.load_report()
    assert report.running_requests == 1 and 0 < report.queued_prefill_tokens <= 200_000
    engine.cancel(long)


async def test_worker_protocol_and_http_api() -> None:
    args = emulate.build_parser().parse_args(["--workers", "2", "--time-scale", "20", "--block-size", "16"])
    emulator = emulate.Emulator(args)
    await emulator.start()
    try:
        options = [("grpc.max_receive_message_length", 64 << 20)]  # tokenizer.json is ~7 MB
        a, b = (
            rpc.WorkerStub(grpc.aio.insecure_channel(w["address"], options=options)) for w in emulator.workers
        )
        health = await a.Health(pb.HealthRequest())
        assert health.status == pb.HealthResponse.STATUS_SERVING and health.block_size == 16
        assert b"model" in (await a.GetModelInfo(pb.ModelInfoRequest())).files["tokenizer.json"]
        feed = a.StreamKvEvents(pb.KvEventsRequest())
        snapshot = await feed.read()
        assert [e.kind for e in snapshot.events] == [pb.KvEvent.KIND_CLEARED, pb.KvEvent.KIND_STORED]
        prompt = list(range(300, 340))
        sampling = pb.SamplingParams(max_tokens=6)
        replies = [
            r
            async for r in a.Generate(
                pb.GenerateRequest(request_id="g", prompt_token_ids=prompt, sampling=sampling)
            )
        ]
        assert (
            sum(len(r.token_ids) for r in replies) == 6
            and replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
        )
        event = await asyncio.wait_for(feed.read(), 10)
        assert list(event.events[0].block_hashes)  # the prompt's two full blocks were stored
        feed.cancel()
        load = await a.GetLoad(pb.LoadRequest())
        assert load.total_blocks > 0 and load.cache_query_tokens == 40
        # P/D: prefill on one worker, decode continues on the other after the modeled handoff
        pre = await a.Prefill(pb.PrefillRequest(request_id="p", prompt_token_ids=prompt, sampling=sampling))
        assert pre.cached_tokens == 32 and len(pre.block_hashes) == 2
        rest = b.Generate(
            pb.GenerateRequest(
                request_id="p", prompt_token_ids=prompt, sampling=sampling, first_token=pre.first_token
            )
        )
        rest = [r async for r in rest]
        assert sum(len(r.token_ids) for r in rest) == 5
        # workers time their own phases: compute without queueing, and the handoff
        assert pre.prefill_s > 0 and rest[0].handoff_s > 0 and not rest[0].token_ids
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await a.Prefill(pb.PrefillRequest(request_id="x", prompt_token_ids=[], sampling=sampling))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the OpenAI API reports cached tokens, streamed or not
        url = emulator.workers[0]["http_url"]
        body = {"model": "emulated", "prompt": " the of and" * 30, "max_tokens": 3}
        async with httpx.AsyncClient() as client:
            first = (await client.post(f"{url}/v1/completions", json=body)).json()
            assert first["usage"]["completion_tokens"] == 3
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: {")]
            usage = json.loads(lines[-1][6:])["usage"]
            assert usage["prompt_tokens"] == 90 and usage["prompt_tokens_details"]["cached_tokens"] == 80
            bad = await client.post(f"{url}/v1/completions", json={"prompt": "", "max_tokens": 1})
            assert bad.status_code == 400
    finally:
        await emulator.stop()


def _start(argv: list[str]) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"{argv[3]} did not start")
    return proc, json.loads(line)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_simulator_agrees_with_live_replay_through_the_router() -> None:
    """Same slice, same profile, same policy, same 0.5 s load polls, same admission queue: the
    simulator and the real router process in front of emulated workers agree within 15% on p50/p90 TTFT and hit rate.
    A 16x token scale keeps tokenization cheap; the load keeps TTFTs at seconds, far above the
    host's per-request overhead (tens of ms even on a busy 2-core machine)."""
    k, bs, workers, load = 16, 4, 2, 0.5
    trace = load_trace(TRACE, block_size=bs, token_scale=k, max_requests=40)
    profile = load_profile("h100-llama8b").scaled(k)
    settings = {
        "chunk_tokens": profile.chunk_tokens,
        "default_prefill_tokens_per_s": profile.prefill_tokens_per_s,
    }
    sim = Simulator(
        trace,
        SimConfig(
            policy="cost",
            workers=workers,
            load_scale=load,
            block_size=bs,
            policy_settings=settings,
            admission=AdmissionConfig().model_dump(),  # the router's default: its queue is on
        ),
        profile,
    ).run()
    tusk = [sys.executable, "-m", "tusk"]
    emu, ready = _start(
        [
            *tusk,
            "emulate",
            "--workers",
            str(workers),
            "--token-scale",
            str(k),
            "--block-size",
            str(bs),
            "--no-http",
            "--stream-interval",
            "0.2",
        ]
    )
    router = None
    try:
        model = {
            "name": "emulated",
            "tokenizer": ready["tokenizer"],
            "block_size": bs,
            "max_model_len": 1 << 20,
        }
        model["workers"] = [{"address": w["address"]} for w in ready["workers"]]
        config = {"port": 0, "models": [model], "routing": {"policy": "cost", "settings": settings}}
        router, info = _start(
            [*tusk, "router", "--config-json", json.dumps(config), "--log-level", "warning"]
        )
        items = trace_items(trace)
        for item in items:
            item.at_s = (item.at_s or 0.0) / load
        args = SimpleNamespace(
            url="http://" + info["address"], model="emulated", api_key=None, endpoint="completions",
            concurrency=None, rate=None, replay=True, time_scale=1.0, scale_latencies=True,
            fresh_connections=False, temperature=0.0, ignore_eos=True, no_stream=False, timeout=120.0,
            seed=0, quiet=True, ttft_slo=2.0, itl_slo=0.1,
        )  # fmt: skip
        time.sleep(1.5)  # the router has polled both workers
        live = asyncio.run(loadgen.run(args, items))
    finally:
        if router is not None:
            _stop(router)
        _stop(emu)
    assert live["errors"] == 0 and sim["completed"] == 40
    got = live["outcomes"]
    for key in ("ttft_p50_s", "ttft_p90_s"):
        assert abs(got[key] - sim[key]) <= 0.15 * sim[key], (key, got[key], sim[key])
    assert abs(live["hit_rate"] - sim["hit_rate"]) <= 0.15 * max(sim["hit_rate"], 0.05), (
        live["hit_rate"],
        sim["hit_rate"],
    )


def test_the_live_router_queues_while_workers_are_busy_and_refuses_past_its_bound() -> None:
    """One emulated worker, an admission queue of two: of six concurrent long prompts the first
    is routed at once, two wait at the router and are routed as the worker frees up, three are
    refused with 429 queue_full; a prompt longer than the worker's KV cache is a 400."""
    tusk = [sys.executable, "-m", "tusk"]
    emu, ready = _start(
        [*tusk, "emulate", "--workers", "1", "--token-scale", "16", "--block-size", "4", "--no-http"]
    )
    router = None
    try:
        model = {
            "name": "emulated",
            "tokenizer": ready["tokenizer"],
            "block_size": 4,
            "max_model_len": 1 << 20,
            "workers": [{"address": w["address"]} for w in ready["workers"]],
        }
        routing = {"policy": "cost", "admission": {"backlog_s": 0.01, "max_waiting": 2}}
        config = {"port": 0, "models": [model], "routing": routing}
        router, info = _start([*tusk, "router", "--config-json", json.dumps(config), "--log-level", "error"])
        url = "http://" + info["address"]

        async def send(client: httpx.AsyncClient, words: int) -> httpx.Response:
            body = {"model": "emulated", "prompt": " the" * words, "max_tokens": 2}
            return await client.post(f"{url}/v1/completions", json=body, timeout=120)

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient() as client:
                for _ in range(100):  # the router has polled the worker
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                # 2000 tokens: 1.3 s of prefill each, far longer than the requests take to arrive
                replies = await asyncio.gather(*(send(client, 2000 + i) for i in range(6)))
                too_long = await send(client, 30_000)  # > the emulated worker's 25,000-token KV
                metrics = (await client.get(f"{url}/metrics")).text
                return [*replies, too_long, metrics]

        *replies, too_long, metrics = asyncio.run(scenario())
    finally:
        if router is not None:
            _stop(router)
        _stop(emu)
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 200, 429, 429, 429], statuses
    assert all(r.json()["error"]["code"] == "queue_full" for r in replies if r.status_code == 429)
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    assert 'tusk_router_admission_held_total{model="emulated"} 2.0' in metrics

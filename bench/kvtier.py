"""KV tier throughput against raw redis-py, and disaggregated vs aggregated TTFT.

Part 1: put/get GB/s of ``KVTierClient`` for batches of 1, 16 and 256 blocks of two shapes (the
tiny model's 32 KiB fp32 block and a Llama-8B-shaped 2 MiB bf16 block), against raw redis-py
(asyncio + hiredis) pipelined SET/GET of the *same bytes under the same keys* in the same run, on
a server this script starts with ``tusk.kvserver.start_server``. Raw and tier runs alternate and
the median of several repetitions is reported. The tier's put includes computing each block's
CRC-32 (the raw SET sends bytes as they are); its get includes verifying it. Two more write
variants are measured to justify the value layout: ``put_blocks`` (checksum, then header and
payload concatenated per block) and raw ``SET header`` + ``APPEND payload`` in MULTI (the
no-concatenation alternative, without any checksum).

Part 2: time to first token for a 2k-token prompt on the engine benchmark's model (the random
30M-parameter Llama of bench/engine.py; ``--ttft-model tiny`` for the embedded model), aggregated (one engine, no
tier) vs disaggregated (prefill engine computes, writes its blocks through and flushes before
"answering"), plus the decode side's handoff (load the prompt's blocks from the tier, compute the
next token) vs the aggregated engine's next decode step.

Usage: python bench/kvtier.py [--quick] [--skip-ttft]. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from tusk.kvformat import ModelFingerprint, encode_block
from tusk.kvserver import start_server
from tusk.kvtier.client import BlockData, KVTierClient, new_value_buffer, seal_value

MIB = 1 << 20
SHAPES = {
    # layers, K/V, tokens, kv heads, head dim
    "tiny_fp32": ("float32", (4, 2, 16, 2, 32)),
    "llama8b_bf16": ("bfloat16", (32, 2, 16, 8, 128)),
}
BATCHES = (1, 16, 256)


def fingerprint(dtype: str, shape: tuple[int, ...]) -> ModelFingerprint:
    layers, _, block_size, heads, dim = shape
    return ModelFingerprint("bench", dtype, "L2NTHD", block_size, layers, heads, dim)


def payload_bytes(dtype: str, shape: tuple[int, ...]) -> bytes:
    size = {"float32": 4, "bfloat16": 2}[dtype] * math.prod(shape)
    return bytes((i * 131 + 7) % 251 for i in range(4096)) * (size // 4096) + b"\x01" * (size % 4096)


def paired_ratio(raw_times: list[float], tier_times: list[float]) -> float:
    """Tier throughput over raw throughput, the median over repetitions."""
    return statistics.median(r / t for r, t in zip(raw_times, tier_times, strict=True))


async def timed(fn) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def bench_shape(url: str, name: str, dtype: str, shape, batch: int, reps: int) -> dict:
    payload = payload_bytes(dtype, shape)
    header_len = len(encode_block(dtype, shape, payload)) - len(payload)
    value = encode_block(dtype, shape, payload)
    header = value[:header_len]
    hashes = list(range(1, batch + 1))
    client = KVTierClient(url, fingerprint(dtype, shape), timeout_s=60, max_inflight_bytes=1 << 40)
    raw = aioredis.Redis.from_url(url, socket_timeout=60)
    keys = [client.key(h) for h in hashes]
    # The worker's write path: the engine's gather copies each block into a buffer that already
    # has room for the header; the client checksums it in place and sends the buffer as is.
    buffers = []
    for _ in range(batch):
        buf, view = new_value_buffer(dtype, shape)
        view[:] = payload
        buffers.append(buf)

    # Raw SET sends the very bytes the tier stores, one distinct object per block as a worker
    # would have (one shared object would sit in the CPU cache and flatter the baseline).
    raw_values = [bytes(seal_value(b, dtype, shape)) for b in buffers]
    payloads = [memoryview(b)[header_len:] for b in buffers]
    blocks = [BlockData(dtype, shape, p) for p in payloads]

    async def raw_put():
        pipe = raw.pipeline(transaction=False)
        for k, v in zip(keys, raw_values, strict=True):
            pipe.set(k, v)
        await pipe.execute()

    async def raw_get():
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        got = await pipe.execute()
        assert all(g is not None for g in got)

    async def raw_set_append():
        pipe = raw.pipeline(transaction=True)
        for k, p in zip(keys, payloads, strict=True):
            pipe.set(k, header)
            pipe.append(k, p)
        await pipe.execute()

    async def tier_put():
        values = [seal_value(b, dtype, shape) for b in buffers]  # includes the CRC-32 pass
        assert await client.put_values(hashes, values) == batch

    async def tier_put_concat():
        assert await client.put_blocks(hashes, blocks) == batch

    async def tier_get():
        got = await client.get_blocks(hashes)
        assert all(g is not None for g in got)

    ops = {
        "raw_put": raw_put,
        "tier_put": tier_put,
        "raw_get": raw_get,
        "tier_get": tier_get,
        "tier_put_concat": tier_put_concat,
        "raw_set_append": raw_set_append,
    }
    await tier_put()  # warm connections and make every key exist
    await raw_get()
    times: dict[str, list[float]] = {op: [] for op in ops}
    for rep in range(reps):
        # raw and tier of each operation run back to back, in alternating order
        pairs = [("raw_put", "tier_put"), ("raw_get", "tier_get"), ("tier_put_concat", "raw_set_append")]
        order = [op for pair in pairs for op in (pair if rep % 2 == 0 else reversed(pair))]
        for op in order:  # every write variant leaves valid values for the gets
            times[op].append(await timed(ops[op]))
    await client.close()
    await raw.aclose()
    nbytes = batch * len(value)
    gbps = {op: nbytes / statistics.median(t) / 1e9 for op, t in times.items()}
    row = {
        "shape": name,
        "batch": batch,
        "block_bytes": len(value),
        "reps": reps,
        **{f"{op}_GBps": round(v, 3) for op, v in gbps.items()},
        # Median of per-repetition ratios: raw and tier ran back to back, so each pair saw the
        # same background load; robust when other work on the machine comes and goes.
        "put_ratio": round(paired_ratio(times["raw_put"], times["tier_put"]), 3),
        "get_ratio": round(paired_ratio(times["raw_get"], times["tier_get"]), 3),
    }
    print(
        f"{name:13s} batch {batch:3d}: put {gbps['tier_put']:.3f} GB/s vs raw {gbps['raw_put']:.3f} "
        f"({row['put_ratio']:.2f}x), get {gbps['tier_get']:.3f} vs raw {gbps['raw_get']:.3f} "
        f"({row['get_ratio']:.2f}x); concat put {gbps['tier_put_concat']:.3f}, "
        f"SET+APPEND {gbps['raw_set_append']:.3f}",
        flush=True,
    )
    return row


def throughput(quick: bool) -> list[dict]:
    server = start_server(maxmemory="1200mb")
    rows = []
    try:
        for name, (dtype, shape) in SHAPES.items():
            block = math.prod(shape) * (4 if dtype == "float32" else 2)
            for batch in BATCHES:
                # Enough paired repetitions that a busy machine's noise averages out.
                target = (32 if quick else 256) * MIB
                reps = max(
                    3 if quick else 10, min(200 if quick else 2000, math.ceil(target / (block * batch)))
                )
                if block * batch >= 256 * MIB:
                    reps = (
                        3 if quick else 5
                    )  # 512 MiB per batch: fits maxmemory once; few reps bound the run time
                rows.append(asyncio.run(bench_shape(server.url, name, dtype, shape, batch, reps)))
    finally:
        server.stop()
    return rows


# -- TTFT --------------------------------------------------------------------------------------


def ttft(prompt_len: int, reps: int, model_name: str) -> dict:
    from tusk.worker.engine import LLMEngine
    from tusk.worker.sequence import SamplingParams

    from tusk.config import EngineConfig, KVTierConfig, Role
    from tusk.tiny_model import tiny_model_dir

    if model_name == "tiny":
        model = tiny_model_dir()
    else:  # the engine benchmark's model (bench/engine.py), built the same way
        spec = importlib.util.spec_from_file_location("engine_bench", Path(__file__).with_name("engine.py"))
        engine_bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(engine_bench)
        model = engine_bench.build_model(Path(tempfile.mkdtemp(prefix="tusk-bench-")) / "llama-30m")
    server = start_server(maxmemory="1gb")
    cfg = EngineConfig(
        device="cpu",
        dtype="float32",
        num_kv_blocks=2 * (prompt_len // 16 + 8),
        max_num_batched_tokens=max(2048, prompt_len),
    )
    tier = KVTierConfig(url=server.url, host_cache_blocks=0)
    engines = {
        "agg": LLMEngine(model, cfg, Role.BOTH),
        "prefill": LLMEngine(model, cfg, Role.PREFILL, kv_tier=tier),
        "decode": LLMEngine(model, cfg, Role.DECODE, kv_tier=tier),
    }
    sp = SamplingParams(max_tokens=2, ignore_eos=True)

    def until(engine, rid: str, tokens: int) -> tuple[float, list[int]]:
        """Seconds until ``rid`` has produced ``tokens`` new tokens (or finished)."""
        got: list[int] = []
        started = time.perf_counter()
        while len(got) < tokens:
            outs = [o for o in engine.step() if o.request_id == rid]
            for o in outs:
                got += o.new_token_ids
            if outs and outs[-1].finished:
                break
        return time.perf_counter() - started, got

    samples: dict[str, list[float]] = {"agg_ttft": [], "agg_second": [], "disagg_ttft": [], "handoff": []}
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            vocab = engines["agg"].spec.vocab_size
            prompt = [(i * 7919 + rep * 104729) % (vocab - 3) + 3 for i in range(prompt_len)]
            agg = engines["agg"]
            agg.add_request(f"a{rep}", prompt, sp)
            t_first, first = until(agg, f"a{rep}", 1)
            t_second, _ = until(agg, f"a{rep}", 1)

            pre = engines["prefill"]
            started = time.perf_counter()
            pre.add_request(f"p{rep}", prompt, sp, prefill_only=True)
            _, pfirst = until(pre, f"p{rep}", 1)
            written = pre.connector.flush(f"p{rep}", 30).result(timeout=60)
            t_disagg = time.perf_counter() - started
            assert pfirst == first, "prefill worker disagrees with the aggregated engine"
            assert written == prompt_len // 16, f"only {written} blocks reached the tier"

            dec = engines["decode"]
            dec.add_request(f"d{rep}", prompt, sp, first_token=pfirst[0])
            t_handoff, _ = until(dec, f"d{rep}", 1)
            if rep:
                samples["agg_ttft"].append(t_first)
                samples["agg_second"].append(t_second)
                samples["disagg_ttft"].append(t_disagg)
                samples["handoff"].append(t_handoff)
            assert dec.stats()["tier_hit_tokens"] > 0, "decode engine did not load from the tier"
    finally:
        for engine in engines.values():
            engine.close()
        server.stop()
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "model": model_name,
        "block_bytes": engines["agg"].bytes_per_block,
        "prompt_tokens": prompt_len,
        "reps": reps,
        "agg_ttft_s": round(med["agg_ttft"], 4),
        "disagg_ttft_s": round(med["disagg_ttft"], 4),
        "ttft_ratio": round(med["disagg_ttft"] / med["agg_ttft"], 3),
        "agg_next_token_s": round(med["agg_second"], 4),
        "decode_handoff_s": round(med["handoff"], 4),
    }
    print(
        f"TTFT {prompt_len} tokens: aggregated {result['agg_ttft_s']:.4f}s, disaggregated "
        f"{result['disagg_ttft_s']:.4f}s ({result['ttft_ratio']:.2f}x); decode handoff "
        f"{result['decode_handoff_s']:.4f}s vs aggregated next token {result['agg_next_token_s']:.4f}s",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument(
        "--ttft-model",
        choices=["engine", "tiny"],
        default="engine",
        help="engine: bench/engine.py's 30M-parameter random Llama (default); tiny: the embedded model",
    )
    args = parser.parse_args(argv)
    summary: dict = {"bench": "kvtier", "machine": "loopback, client and server share the host's cores"}
    if not args.skip_throughput:
        rows = throughput(args.quick)
        summary["min_put_ratio"] = min(r["put_ratio"] for r in rows)
        summary["min_get_ratio"] = min(r["get_ratio"] for r in rows)
        summary["target_ratio"] = 0.8
        summary["throughput"] = rows
    if not args.skip_ttft:
        summary["ttft"] = ttft(args.prompt_tokens, reps=2 if args.quick else 5, model_name=args.ttft_model)
        summary["ttft_target_ratio"] = 1.25
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Live routing benchmark: the real ``tusk router`` process (every policy profile) and the real
peer routers (smg, vllm-router) in front of the same emulated workers, replaying a trace.

    python bench/routing_live.py --trace FILE [--workers N] [--quick]

For each system a fresh ``tusk emulate`` process hosts N workers (H100 Llama-8B profile, cold
caches), the router under test fronts them (tusk over the worker gRPC protocol with KV events;
smg and vllm-router over the emulators' OpenAI HTTP API, ``--policy cache_aware`` with their
defaults), and ``tusk bench``'s replay client sends the trace's requests at their arrival
times (streaming, usage included). Every request opens a fresh connection, for every system:
smg does not set TCP_NODELAY on accepted connections, and a reused connection stalls its
streamed chunks ~40 ms.

Load: the simulator (the same worker model and information model as the emulator, see
docs/routing.md) finds the smallest load scale on a x1.25 ladder at which round robin's p90
TTFT is >= 3x its unloaded p90; every system runs there (load_factor 1.0) and at 1.5x.

Time and size, so a run fits a 2-core machine: ``--token-scale K`` (default 8) shrinks every
prompt K-fold and scales the profile to match (one word stands for K trace tokens; prefill
time, KV share and transfer bytes are unchanged, see ``WorkerProfile.scaled``), because the
router and the emulator tokenize every prompt (~4 us per token here). ``--time-scale`` is
emulated seconds per wall second (default 1: real time). ``--quick`` replays the first 700
requests of the trace (``--requests`` overrides) at both loads with ``--time-scale 2`` and
``--token-scale 16``; any trace size takes the same time (~12 min here). The simulator runs the same slice for every tusk policy (labelled "sim") so the
live and simulated numbers can be compared.

The last line printed is one JSON object: {"trace", "loads": [{"load_factor", "systems":
{name: {"p90_ttft_s", "p50_ttft_s", "hit_rate", "errors", ...}}}], ...}. Latencies are in the
emulated engine's seconds (wall x time scale).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from tusk.router import loadgen
from tusk.router.policies.base import DEFAULT_CLAIM_TTL_S
from tusk.router.sim.cluster import SimConfig, Simulator
from tusk.router.sim.profile import load_profile
from tusk.router.sim.trace import TraceRequest, load_trace
from tusk.router.workload import trace_items

from tusk.config import AdmissionConfig

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
TUSK_SYSTEMS = ("round_robin", "cost", "sglang_cache_aware", "llmd_sticky", "llmd_weighted", "dynamo_cost")
PEERS = {
    "smg": Path("/work/peers/smg/bin/smg"),
    "vllm_router": Path("/work/peers/vllm-router/bin/vllm-router"),
}
# P/D variants of cost (run with --prefill/--decode): fixed thresholds around the tuned rule
VARIANTS = {
    "cost_never_split": ("cost", {"disaggregation_threshold_tokens": 1 << 30}),
    "cost_always_split": ("cost", {"disaggregation_threshold_tokens": 0}),
}
# cost as it ships queues at the router (tusk.router.admission); cost_fcfs is the same policy
# with that queue off, so a table can show what each part is worth (``--systems ...,cost_fcfs``;
# not in the default list, which keeps ``--quick`` under 15 minutes here). The peer profiles run as
# their projects ship them: none of them orders requests at the router.
FCFS = ("cost_fcfs",)
SYSTEMS = (*TUSK_SYSTEMS, *FCFS, *PEERS, *VARIANTS)


def policy_of(system: str) -> tuple[str, dict[str, Any]]:
    if system in FCFS:
        return "cost", {}
    return VARIANTS.get(system, (system, {}))


def admission_of(system: str) -> dict[str, Any]:
    """The router's admission settings for a system: tusk's defaults for cost, off otherwise."""
    if policy_of(system)[0] == "cost" and system not in FCFS:
        return AdmissionConfig().model_dump()
    return AdmissionConfig(backlog_s=0).model_dump()


def sim_admission(system: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The same queue in the simulator's clock: it runs in emulated seconds, the live router's
    queue ages requests by wall seconds (``time_scale`` emulated seconds each)."""
    adm = admission_of(system)
    if not adm["backlog_s"]:
        return None
    return adm | {"aging": adm["aging"] / args.time_scale}


POLL_S = 0.5  # the tusk router's load poll (wall seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process that prints one JSON ready line (or none), stopped with SIGTERM."""

    def __init__(self, argv: list[str], ready_line: bool, log: Path) -> None:
        self.log = log.open("wb")
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE if ready_line else self.log, stderr=self.log, start_new_session=True
        )
        self.ready: dict[str, Any] = {}
        if ready_line:
            assert self.p.stdout is not None
            line = self.p.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(f"{argv[0]} exited before it was ready; see {log}")
            self.ready = json.loads(line)

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


def start_emulator(args: argparse.Namespace, logdir: Path) -> Proc:
    layout = ["--prefill", str(args.prefill), "--decode", str(args.decode)] if args.prefill else []
    argv = [
        sys.executable,
        "-m",
        "tusk",
        "emulate",
        *layout,
        "--workers",
        str(args.workers),
        "--profile",
        args.profile,
        "--time-scale",
        str(args.time_scale),
        "--token-scale",
        str(args.token_scale),
        "--block-size",
        str(args.block_size),
        "--stream-interval",
        str(args.stream_interval),
    ]
    return Proc(argv, True, logdir / "emulate.log")


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The live router's policy settings: the engine's chunk size and prior prefill rate, as
    the simulator gives its policies, and the routes' claim time to live in wall seconds, so
    that a claim lasts its default 2 emulated seconds, as in the simulator (the router's clock
    is the wall; at time scale 4 an unscaled 2 s claim outlived the blocks it stood for 8
    emulated seconds and cost p90 2.3x on the kv-cache-tester slice)."""
    profile = load_profile(args.profile).scaled(args.token_scale)
    return {
        "chunk_tokens": profile.chunk_tokens,
        "default_prefill_tokens_per_s": profile.prefill_tokens_per_s,
        "tier_fetch_s_per_block": profile.tier_fetch_s_per_block(args.block_size),
        "claim_ttl_s": DEFAULT_CLAIM_TTL_S / args.time_scale,
    }


def start_front(system: str, emu: dict[str, Any], args: argparse.Namespace, logdir: Path) -> tuple[Proc, str]:
    workers = emu["workers"]
    if system not in PEERS:
        policy, extra = policy_of(system)
        config = {
            "host": "127.0.0.1",
            "port": 0,
            "models": [
                {
                    "name": emu["model"],
                    "tokenizer": emu["tokenizer"],
                    "block_size": args.block_size,
                    "max_model_len": 1 << 20,
                    "workers": [{"address": w["address"], "role": w["role"]} for w in workers],
                }
            ],
            # the engine's chunk size and prior prefill rate, as the simulator gives its policies
            "routing": {
                "policy": policy,
                "kv_events": True,
                "settings": engine_settings(args) | extra,
                "admission": admission_of(system),
            },
            "max_queue": 100_000,
        }
        argv = [
            sys.executable,
            "-m",
            "tusk",
            "router",
            "--config-json",
            json.dumps(config),
            "--log-level",
            "warning",
        ]
        proc = Proc(argv, True, logdir / f"{system}.log")
        return proc, "http://" + proc.ready["address"]
    binary = PEERS[system]
    port = free_port()
    argv = [str(binary), "launch"] if system == "smg" else [str(binary)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware"]
    argv += ["--worker-urls", *[w["http_url"] for w in workers]]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    argv += ["--log-level", "warn" if system == "smg" else "warning"]
    proc = Proc(argv, False, logdir / f"{system}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            body = {"model": emu["model"], "prompt": " the", "max_tokens": 1}
            if httpx.post(f"{url}/v1/completions", json=body, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.p.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{system} did not come up; see {logdir / (system + '.log')}")
        time.sleep(0.5)
    return proc, url


async def replay(url: str, items: list, args: argparse.Namespace, model: str) -> dict[str, Any]:
    ns = SimpleNamespace(
        url=url,
        model=model,
        api_key=None,
        endpoint="completions",
        concurrency=None,
        rate=None,
        replay=True,
        time_scale=args.time_scale,
        scale_latencies=True,
        fresh_connections=True,
        temperature=0.0,
        ignore_eos=True,
        no_stream=False,
        timeout=600.0,
        seed=0,
        quiet=True,
        ttft_slo=args.ttft_slo,
        itl_slo=args.itl_slo,
    )
    return await loadgen.run(ns, items)


def live_run(system: str, items: list, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    emu = start_emulator(args, logdir)
    front = None
    try:
        front, url = start_front(system, emu.ready, args, logdir)
        if system not in PEERS:
            time.sleep(2 * POLL_S + 0.5)  # the router has polled every worker and holds its KV feed
        t0 = time.perf_counter()
        summary = asyncio.run(replay(url, items, args, emu.ready["model"]))
        out = summary["outcomes"]
        extra = (
            {"disaggregated_fraction": split_fraction(url)} if system not in PEERS and args.prefill else {}
        )
        return extra | {
            "p50_ttft_s": out["ttft_p50_s"],
            "p90_ttft_s": out["ttft_p90_s"],
            "p99_ttft_s": out["ttft_p99_s"],
            "hit_rate": summary["hit_rate"],
            "slo_attainment": summary["slo_attainment"],
            "errors": summary["errors"],
            "error_kinds": summary["error_kinds"],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        if front is not None:
            front.stop()
        emu.stop()


def split_fraction(url: str) -> float | None:
    """Share of routing decisions that split prefill from decode, from the router's metrics."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    split = total = 0.0
    for line in text.splitlines():
        if line.startswith("tusk_router_routing_decisions_total{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            split += value if 'disaggregated="true"' in line else 0.0
    return split / total if total else None


def simulate(
    trace: list[TraceRequest], system: str, load: float, args: argparse.Namespace, profile: Any
) -> dict:
    policy, extra = policy_of(system)
    config = SimConfig(
        policy=policy,
        policy_settings=extra,
        workers=args.workers,
        prefill_workers=args.prefill,
        decode_workers=args.decode,
        load_scale=load,
        block_size=args.block_size,
        poll_interval_s=POLL_S * args.time_scale,
        ttft_slo_s=args.ttft_slo,
        itl_slo_s=args.itl_slo,
        admission=sim_admission(system, args),
    )
    return Simulator(trace, config, profile).run()


def find_load(
    trace: list[TraceRequest], args: argparse.Namespace, profile: Any
) -> tuple[float, float, float]:
    """(load scale, round robin's unloaded p90, its p90 there), in the simulator."""
    unloaded = simulate(trace, "round_robin", 0.01, args, profile)["ttft_p90_s"]
    scale = args.workers / 8
    while True:
        p90 = simulate(trace, "round_robin", scale, args, profile)["ttft_p90_s"]
        if p90 >= 3 * unloaded or scale > 64 * args.workers:
            return scale, unloaded, p90
        scale *= 1.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=TRACES / "synthetic_trace.jsonl")
    p.add_argument("--format", choices=("mooncake", "azure", "kvtester"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--prefill", type=int, default=0, help="P/D layout: prefill workers (with --decode)")
    p.add_argument("--decode", type=int, default=0, help="P/D layout: decode workers")
    p.add_argument("--quick", action="store_true", help="700 requests, time scale 2, token scale 16")
    p.add_argument("--requests", type=int, help="replay the first N requests")
    p.add_argument("--systems", help="comma-separated; default: the tusk profiles, smg and vllm_router")
    p.add_argument("--load-factors", default="1.0,1.5")
    p.add_argument("--load-scale", type=float, help="use this load scale instead of the simulator's ladder")
    p.add_argument("--profile", default="h100-llama8b")
    p.add_argument("--time-scale", type=float, help="emulated seconds per wall second (default 1; quick 2)")
    p.add_argument("--token-scale", type=int, help="default 8; quick 16")
    p.add_argument(
        "--stream-interval", type=float, default=0.2, help="emulator: wall s between token batches"
    )
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--itl-slo", type=float, default=0.1)
    p.add_argument("--logs", type=Path, default=Path("/tmp/tusk-routing-live"))
    args = p.parse_args(argv)
    if args.time_scale is None:
        args.time_scale = 2.0 if args.quick else 1.0
    if args.token_scale is None:
        args.token_scale = 16 if args.quick else 8
    if not args.time_scale > 0 or args.token_scale < 1 or 64 % args.token_scale:
        p.error("--time-scale must be > 0 and --token-scale must divide 64")
    args.block_size = 64 // args.token_scale  # 64-token KV blocks before scaling
    args.requests = args.requests or (700 if args.quick else None)
    default = ",".join((*TUSK_SYSTEMS, *PEERS))
    systems = [s for s in (args.systems or default).split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.prefill and not args.decode:
        p.error("--prefill needs --decode")
    if args.prefill and set(systems) & set(PEERS):
        p.error("the peer routers run aggregated here; leave them out of a P/D run")
    args.system_list = systems
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    profile = load_profile(args.profile).scaled(args.token_scale)
    trace = load_trace(
        args.trace, args.format, args.block_size, token_scale=args.token_scale, max_requests=args.requests
    )
    items = trace_items(trace)
    if args.load_scale:
        load, unloaded, rr_p90 = args.load_scale, float("nan"), float("nan")
    else:
        load, unloaded, rr_p90 = find_load(trace, args, profile)
    print(
        f"trace {args.trace.name}: {len(trace)} requests, {args.workers} workers, profile {profile.name}, "
        f"time scale {args.time_scale}; load scale {load:.3f} (sim: round robin p90 {rr_p90:.2f} s vs "
        f"unloaded {unloaded:.2f} s)",
        flush=True,
    )
    loads = []
    for factor in [float(x) for x in args.load_factors.split(",")]:
        scale = load * factor
        scaled_items = [
            loadgen.WorkItem(it.prompt, it.max_tokens, (it.at_s or 0.0) / scale, it.prompt_tokens)
            for it in items
        ]
        systems: dict[str, Any] = {}
        for system in args.system_list:
            if system in PEERS and not PEERS[system].exists():
                systems[system] = {"skipped": f"{PEERS[system]} is not installed"}
                continue
            try:
                result = live_run(system, scaled_items, args, args.logs)
            except RuntimeError as exc:
                result = {"failed": str(exc)}
            if system not in PEERS:
                sim = simulate(trace, system, scale, args, profile)
                keys = (
                    "ttft_p50_s",
                    "ttft_p90_s",
                    "ttft_p99_s",
                    "hit_rate",
                    "completed",
                    "disaggregated_fraction",
                )
                result["sim"] = {k: sim[k] for k in keys}
            systems[system] = result
            shown = {k: v for k, v in result.items() if k not in ("error_kinds",)}
            print(f"  load x{factor} {system}: {json.dumps(shown)}", flush=True)
        loads.append({"load_factor": factor, "load_scale": scale, "systems": systems})
    print_table(loads)
    print(
        json.dumps(
            {
                "trace": str(args.trace),
                "workers": args.workers,
                "requests": len(trace),
                "profile": profile.name,
                "time_scale": args.time_scale,
                "token_scale": args.token_scale,
                "fresh_connections": True,
                "load_scale": load,
                "sim_round_robin_unloaded_p90_s": unloaded,
                "loads": loads,
            }
        )
    )
    return 0


def print_table(loads: list[dict[str, Any]]) -> None:
    for entry in loads:
        print(f"\nload factor {entry['load_factor']} (load scale {entry['load_scale']:.3f})")
        print(
            f"{'system':<20}{'p50 TTFT':>10}{'p90 TTFT':>10}{'p99 TTFT':>10}{'hit rate':>10}{'errors':>8}"
            "   sim p50 / p90 / p99 / hit"
        )
        for name, r in entry["systems"].items():
            if "p90_ttft_s" not in r:
                print(f"{name:<20}{r}")
                continue
            sim = r.get("sim")
            tail = (
                f"   {sim['ttft_p50_s']:.3f} / {sim['ttft_p90_s']:.3f} / {sim['ttft_p99_s']:.3f} / {sim['hit_rate']:.3f}"
                if sim
                else ""
            )
            print(
                f"{name:<20}{r['p50_ttft_s']:>10.3f}{r['p90_ttft_s']:>10.3f}{r['p99_ttft_s']:>10.3f}"
                f"{r['hit_rate']:>10.3f}{r['errors']:>8}{tail}"
            )


if __name__ == "__main__":
    sys.exit(main())

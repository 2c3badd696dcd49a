"""``tusk sim``: replay a trace through the real routing policies on a modeled cluster."""

from __future__ import annotations

import argparse
import json
import sys

from tusk.router.policies import POLICY_NAMES
from tusk.router.sim.cluster import SimConfig, Simulator
from tusk.router.sim.profile import PROFILES, load_profile
from tusk.router.sim.trace import FORMATS, TraceError, load_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tusk sim", description=__doc__)
    p.add_argument(
        "--trace", required=True, help="Mooncake .jsonl, Azure .csv or kv-cache-tester .tar.xz/.json"
    )
    p.add_argument("--format", choices=FORMATS, help="default: from the file name")
    p.add_argument("--policy", default="cost", choices=POLICY_NAMES)
    p.add_argument("--workers", type=int, default=8, help="aggregated workers (role=both)")
    p.add_argument("--prefill-workers", type=int, default=0)
    p.add_argument("--decode-workers", type=int, default=0)
    p.add_argument("--load-scale", type=float, default=1.0, help="divide arrival times by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="h100-llama8b", help=f"{sorted(PROFILES)} or a JSON file")
    p.add_argument("--block-size", type=int, default=64, help="model KV block size in tokens")
    p.add_argument("--tier-blocks", type=int, default=0, help="shared KV tier capacity in blocks (0: none)")
    p.add_argument("--no-kv-events", action="store_true", help="approximate index (record_route)")
    p.add_argument("--disaggregation-threshold", type=int, default=None, help="fixed override (cost)")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    p.add_argument("--itl-slo", type=float, default=0.1, help="seconds (mean per request)")
    p.add_argument("--max-requests", type=int, default=None, help="only the first N requests")
    p.add_argument("--poll-interval", type=float, default=0.5, help="load report poll, seconds (0: exact)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_requests is not None and args.max_requests < 1:
            raise ValueError("--max-requests must be >= 1")
        trace = load_trace(args.trace, args.format, args.block_size, max_requests=args.max_requests)
        profile = load_profile(args.profile)
        settings = {}
        if args.disaggregation_threshold is not None:
            settings["disaggregation_threshold_tokens"] = args.disaggregation_threshold
        config = SimConfig(
            policy=args.policy,
            workers=args.workers,
            prefill_workers=args.prefill_workers,
            decode_workers=args.decode_workers,
            load_scale=args.load_scale,
            seed=args.seed,
            block_size=args.block_size,
            tier_blocks=args.tier_blocks,
            kv_events=not args.no_kv_events,
            ttft_slo_s=args.ttft_slo,
            itl_slo_s=args.itl_slo,
            policy_settings=settings,
            poll_interval_s=args.poll_interval,
        )
        result = Simulator(trace, config, profile).run()
    except (TraceError, ValueError, OSError) as exc:
        print(f"tusk sim: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

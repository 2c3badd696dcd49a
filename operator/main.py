"""``tusk operator``: run the ModelDeployment operator (kopf) with the project's defaults.

Two deployment shapes: namespace-scoped (``--namespace``, repeatable) or cluster-wide
(``--all-namespaces``). Several replicas may run; kopf peering keeps exactly one active (the one
with the highest ``--priority``), the others stand by. ``--standalone`` skips peering for local
development. Liveness and readiness are kopf's health endpoint (``--health-port``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from tusk.operator.desired import DEFAULT_WORKER_IMAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tusk operator", description=__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--standalone", action="store_true", help="no peering: for development, one replica only"
    )
    parser.add_argument(
        "--peering-name", default="tusk-operator", help="kopf peering object shared by replicas"
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(os.environ.get("TUSK_OPERATOR_PRIORITY", "0")),
        help="peering priority; the highest-priority replica is the active one",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8080,
        help="serve liveness/readiness on http://0.0.0.0:PORT/healthz (0 = off)",
    )
    parser.add_argument(
        "--worker-image",
        default=os.environ.get("TUSK_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
        help="worker image when a ModelDeployment names none",
    )
    parser.add_argument(
        "--router-url",
        default=os.environ.get("TUSK_ROUTER_URL"),
        help="OpenAI base URL of the router, reported as status.endpoint",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(os.environ.get("TUSK_OPERATOR_RESYNC_SECONDS", "30")),
        help="how often each ModelDeployment is re-checked for drift and status",
    )
    parser.add_argument(
        "--image-pull-policy",
        default=os.environ.get("TUSK_IMAGE_PULL_POLICY", "IfNotPresent"),
        choices=["Always", "IfNotPresent", "Never"],
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import kopf
    from tusk.operator import handlers

    handlers.OPTIONS = handlers.Options(
        worker_image=args.worker_image,
        router_url=args.router_url,
        resync_seconds=args.resync_seconds,
        image_pull_policy=args.image_pull_policy,
    )
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    try:
        peering = {} if args.standalone else {"peering_name": args.peering_name, "priority": args.priority}
        kopf.run(
            standalone=args.standalone,
            **peering,
            liveness_endpoint=liveness,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
        )
    except KeyboardInterrupt:
        pass
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``tusk operator``: run the ModelDeployment operator (kopf) with the project's defaults.

Two deployment scopes: namespace-scoped (``--namespace``, repeatable) or cluster-wide
(``--all-namespaces``). Several replicas may run with ``--leader-elect``: they elect one leader
through a coordination.k8s.io Lease, the others stand by (their log says so and /readyz answers
503) and take over within a few lease durations when the leader goes. Without it the operator
runs alone. kopf's own peering (``--peering-name``) is still available, but the named peering
object must exist (the operator refuses to start otherwise, instead of silently pausing), and
each replica gets a distinct priority unless one is given. Liveness is /healthz, readiness
/readyz on ``--health-port``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tusk.operator.desired import DEFAULT_WORKER_IMAGE

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
log = logging.getLogger("tusk.operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tusk operator", description=__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--standalone", action="store_true", help="one replica: no leader election, no peering (default)"
    )
    mode.add_argument(
        "--leader-elect",
        action="store_true",
        default=os.environ.get("TUSK_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
        help="elect one active replica through a Lease; the others stand by",
    )
    parser.add_argument(
        "--leader-election-namespace",
        default=None,
        help="namespace of the Lease (default: the pod's namespace, from POD_NAMESPACE)",
    )
    parser.add_argument("--leader-election-name", default="tusk-operator", help="name of the Lease")
    parser.add_argument("--leader-election-lease-duration", type=float, default=15.0, help=argparse.SUPPRESS)
    parser.add_argument("--leader-election-renew-deadline", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--leader-election-retry-period", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--peering-name",
        default=None,
        help="kopf peering object shared by replicas (must exist; ignored with --leader-elect)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(os.environ["TUSK_OPERATOR_PRIORITY"])
        if os.environ.get("TUSK_OPERATOR_PRIORITY")
        else None,
        help="kopf peering priority (default: random, so no two replicas tie and pause each other)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=8080,
        help="serve /healthz (liveness) and /readyz (readiness) on 0.0.0.0:PORT (0 = off)",
    )
    parser.add_argument(
        "--worker-image",
        default=os.environ.get("TUSK_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
        help="worker image when a ModelDeployment names none; {flavor} becomes cpu, cuda, rocm or xpu",
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


class Health:
    """What /healthz and /readyz report: alive while the process runs; ready once kopf runs and,
    with leader election, only on the leader."""

    def __init__(self) -> None:
        self.kopf_ready = threading.Event()
        self.state = "starting"  # starting | standby | leader | running
        self.stall_seconds = 60.0

    def liveness(self) -> tuple[int, str]:
        """200 while the process serves; 503 once kopf's event loop has stopped beating."""
        from tusk.operator import handlers

        beat = handlers.last_beat
        if beat is not None and time.monotonic() - beat > self.stall_seconds:
            return 503, f"kopf's event loop has not run for {time.monotonic() - beat:.0f}s\n"
        return 200, "ok\n"

    def readiness(self) -> tuple[int, str]:
        if self.state == "standby":
            return 503, "standby: waiting for leadership\n"
        if not self.kopf_ready.is_set():
            return 503, "starting\n"
        return 200, f"ok: {self.state}\n"

    def serve(self, port: int) -> http.server.ThreadingHTTPServer:
        health = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?")[0].rstrip("/")
                if path == "/healthz":
                    code, text = health.liveness()
                elif path == "/readyz":
                    code, text = health.readiness()
                else:
                    code, text = 404, "not found\n"
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # probes every few seconds would drown the log

        server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server


def _pod_namespace(flag: str | None) -> str | None:
    if flag:
        return flag
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _identity() -> str:
    """Unique per process (as client-go's hostname_uuid): a restarted replica is a new candidate."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _peering_exists(kube: Any, name: str, namespaces: list[str]) -> str | None:
    """None when the peering object(s) exist, else what is missing."""
    from tusk.operator.kube import ApiError

    paths = (
        [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{name}" for ns in namespaces]
        if namespaces
        else [f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"]
    )
    for path in paths:
        try:
            kube._call("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return path
            raise
    return None


def _run_kopf(args: argparse.Namespace, health: Health, **peering: Any) -> None:
    """kopf in this (main) thread, so SIGTERM stops it gracefully. No stop flag: kopf waits for a
    thread-side flag in an executor thread that would then keep the process from exiting."""
    import kopf

    try:
        kopf.run(
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            ready_flag=health.kopf_ready,
            **peering,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


def _run_elected(args: argparse.Namespace, health: Health, kube: Any) -> int:
    from tusk.operator.leader import ElectionConfig, LeaderElector

    namespace = _pod_namespace(args.leader_election_namespace)
    if not namespace:
        print(
            "tusk operator: --leader-elect needs --leader-election-namespace (or POD_NAMESPACE)",
            file=sys.stderr,
        )
        return 2
    try:
        config = ElectionConfig(
            namespace,
            args.leader_election_name,
            _identity(),
            args.leader_election_lease_duration,
            args.leader_election_renew_deadline,
            args.leader_election_retry_period,
        )
    except ValueError as exc:
        print(f"tusk operator: {exc}", file=sys.stderr)
        return 2
    elector = LeaderElector(kube, config)
    stop_waiting = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop_waiting.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    health.state = "standby"
    try:
        if not elector.acquire(stop_waiting):
            return 0  # stopped while standing by
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    health.state = "leader"
    done, lost = threading.Event(), threading.Event()

    def renew() -> None:
        if not elector.renew_until_lost(done):
            lost.set()
            os.kill(os.getpid(), signal.SIGTERM)  # kopf's own graceful stop

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        _run_kopf(args, health, standalone=True)
    finally:
        done.set()
        renewer.join(timeout=5)
    if lost.is_set():
        return 1  # restart as a candidate; a new leader takes over meanwhile
    elector.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from tusk.operator import handlers
    from tusk.operator.kube import ApiError, Kube, load_api_client

    handlers.OPTIONS = handlers.Options(
        worker_image=args.worker_image,
        router_url=args.router_url,
        resync_seconds=args.resync_seconds,
        image_pull_policy=args.image_pull_policy,
    )
    health = Health()
    server = health.serve(args.health_port) if args.health_port else None
    try:
        if args.leader_elect:
            return _run_elected(args, health, Kube(load_api_client()))
        if args.peering_name and not args.standalone:
            try:
                missing = _peering_exists(Kube(load_api_client()), args.peering_name, args.namespace)
            except ApiError as exc:
                print(f"tusk operator: cannot check peering {args.peering_name!r}: {exc}", file=sys.stderr)
                return 2
            if missing:
                print(
                    f"tusk operator: peering {args.peering_name!r} not found ({missing}); create it, "
                    "or run with --leader-elect",
                    file=sys.stderr,
                )
                return 2
            priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
            log.info("kopf peering %r with priority %d", args.peering_name, priority)
            health.state = "running"
            _run_kopf(args, health, peering_name=args.peering_name, priority=priority)
            return 0
        health.state = "running"
        _run_kopf(args, health, standalone=True)
        return 0
    finally:
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    sys.exit(main())

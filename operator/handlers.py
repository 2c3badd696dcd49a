"""kopf handlers: turn each ModelDeployment into its children, keep them so, report honestly.

Level-triggered: every handler (create, update, resume) and a per-object resync daemon run the
same ``reconcile``: parse, pre-flight, create-or-patch every child, prune children the spec no
longer wants, then write status. Running it twice changes nothing, so re-delivered events and
operator restarts are harmless. Problems of one object become its Degraded condition and an
Event; they are never raised out of the handler, so one bad object cannot stall the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import kopf
from tusk.operator import apply, preflight
from tusk.operator.desired import DEFAULT_WORKER_IMAGE, Defaults, Owner, all_child_refs, desired_children
from tusk.operator.kube import ApiError, Kube, load_api_client, path_for
from tusk.operator.schema import GROUP, PLURAL, VERSION
from tusk.operator.spec import InvalidSpec, parse_spec
from tusk.operator.status import Observation, build_status, status_changed

RESOURCE = (GROUP, VERSION, PLURAL)
FINALIZER = "tusk.dev/cleanup"


@dataclass
class Options:
    """Operator-wide settings; ``tusk operator`` flags fill them, env vars are the fallback."""

    worker_image: str = DEFAULT_WORKER_IMAGE
    router_url: str | None = None
    resync_seconds: float = 30.0
    image_pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls) -> Options:
        return cls(
            worker_image=os.environ.get("TUSK_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
            router_url=os.environ.get("TUSK_ROUTER_URL") or None,
            resync_seconds=float(os.environ.get("TUSK_OPERATOR_RESYNC_SECONDS", "30")),
            image_pull_policy=os.environ.get("TUSK_IMAGE_PULL_POLICY", "IfNotPresent"),
        )

    def defaults(self) -> Defaults:
        return Defaults(
            worker_image=self.worker_image,
            router_url=self.router_url,
            image_pull_policy=self.image_pull_policy,
        )


OPTIONS: Options | None = None  # set by main(); None = read the environment at startup


@dataclass
class Runtime:
    options: Options
    kube: Kube
    capacity: preflight.NodeCapacity


_runtime: Runtime | None = None


def runtime() -> Runtime:
    if _runtime is None:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return _runtime


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials read when the operator starts (not when a library was imported)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global _runtime
    options = OPTIONS or Options.from_env()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tusk.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="tusk.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    kube = Kube(await asyncio.to_thread(load_api_client))
    _runtime = Runtime(options, kube, preflight.NodeCapacity(kube))
    logger.info(
        "tusk operator configured: worker image %s, resync every %ss",
        options.worker_image,
        options.resync_seconds,
    )


def _owner(body: kopf.Body) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 1))


def _lock(memo: kopf.Memo) -> asyncio.Lock:
    lock = getattr(memo, "reconcile_lock", None)
    if lock is None:
        lock = memo.reconcile_lock = asyncio.Lock()
    return lock


def _degraded_message(status: dict[str, Any] | None) -> str | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == "Degraded" and cond.get("status") == "True":
            return cond.get("message")
    return None


def _is_ready(status: dict[str, Any] | None) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (status or {}).get("conditions") or []
    )


async def _write_status(kube: Kube, owner: Owner, status: dict[str, Any]) -> None:
    path = path_for("ModelDeployment", owner.namespace, owner.name) + "/status"
    await kube.call("PATCH", path, {"status": status}, "application/merge-patch+json")


async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, cause: str) -> dict[str, Any]:
    """One level-triggered pass over one ModelDeployment; returns the status it wrote (or kept)."""
    rt = runtime()
    async with _lock(memo):
        if body["metadata"].get("deletionTimestamp"):
            return {}
        owner = _owner(body)
        previous = dict(body.get("status") or {})
        problems: list[preflight.Problem] = []
        conflicts: list[str] = []
        live: dict[str, dict[str, Any]] = {}
        changed = False
        try:
            spec = parse_spec(dict(body.get("spec") or {}))
        except InvalidSpec as exc:
            spec = None
            problems.append(preflight.Problem("InvalidSpec", str(exc)))
        try:
            if spec is not None:
                children = desired_children(owner, spec, rt.options.defaults())
                problems += await preflight.check(rt.kube, rt.capacity, owner.namespace, spec)
                if problems or spec.paused:
                    live = await apply.read_children(rt.kube, children)
                else:
                    result = await apply.apply_children(rt.kube, children, owner.uid)
                    live, conflicts, changed = result.live, result.conflicts, result.changed
                    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
                    stale = [
                        ref
                        for ref in all_child_refs(owner)
                        if (ref["kind"], ref["metadata"]["name"]) not in wanted
                    ]
                    pruned = await apply.delete_children(rt.kube, stale, owner.uid)
                    if result.created:
                        kopf.info(body, reason="Created", message=f"created {', '.join(result.created)}")
                    if result.repaired:
                        why = "Updated" if cause in ("create", "update") else "DriftRepaired"
                        kopf.info(body, reason=why, message=f"patched {', '.join(result.repaired)}")
                    if pruned:
                        kopf.info(
                            body, reason="Pruned", message=f"deleted {', '.join(pruned)} (no longer in spec)"
                        )
                    changed = changed or bool(pruned)
                    if conflicts:
                        logger.warning("children owned by someone else: %s", conflicts)
        except ApiError as exc:
            if exc.transient:
                raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=5) from None
            problems.append(preflight.Problem("ApplyFailed", str(exc)))

        status = build_status(
            Observation(owner, spec, live, problems, conflicts, changed, rt.options.router_url), previous
        )
        old_degraded, new_degraded = _degraded_message(previous), _degraded_message(status)
        if new_degraded and new_degraded != old_degraded:
            reason = next(c["reason"] for c in status["conditions"] if c["type"] == "Degraded")
            kopf.warn(body, reason=reason, message=new_degraded)
        elif old_degraded and not new_degraded:
            kopf.info(body, reason="Recovered", message="no problems found")
        if _is_ready(status) and not _is_ready(previous):
            kopf.info(body, reason="Ready", message="the model is serving")
        if status_changed(status, previous):
            try:
                await _write_status(rt.kube, owner, status)
            except ApiError as exc:
                if exc.status == 404:  # deleted meanwhile
                    return status
                raise kopf.TemporaryError(f"writing status: {exc}", delay=5) from None
        return status


@kopf.on.resume(*RESOURCE)
async def on_resume(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, memo, logger, "resume")


@kopf.on.create(*RESOURCE)
async def on_create(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, memo, logger, "create")


@kopf.on.update(*RESOURCE, field="spec")
async def on_update(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, memo, logger, "update")


async def _sleep_unless_stopped(stopped: kopf.DaemonStopped, seconds: float) -> None:
    # Short naps instead of stopped.wait(timeout): that helper leaves a timer task behind when the
    # daemon is cancelled at shutdown, which surfaced as a TimeoutError from the operator.
    deadline = asyncio.get_running_loop().time() + seconds
    while not stopped:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 1.0))


@kopf.daemon(*RESOURCE, cancellation_timeout=5.0)
async def resync(
    stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Drift repair and status refresh: children change without touching the ModelDeployment."""
    while not stopped:
        await _sleep_unless_stopped(stopped, runtime().options.resync_seconds)
        if stopped:
            break
        try:
            await reconcile(body, memo, logger, "resync")
        except kopf.TemporaryError as exc:
            logger.warning("resync will retry: %s", exc)
        except Exception:  # noqa: BLE001 - keep the loop alive; the next pass retries
            logger.exception("resync failed")


@kopf.on.delete(*RESOURCE, optional=True)  # the resync daemon already holds the finalizer
async def on_delete(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Delete children explicitly: works without a garbage collector and reports what went."""
    rt = runtime()
    owner = _owner(body)
    try:
        deleted = await apply.delete_children(rt.kube, all_child_refs(owner), owner.uid)
    except ApiError as exc:
        raise kopf.TemporaryError(f"deleting children: {exc}", delay=5) from None
    if deleted:
        kopf.info(body, reason="Deleted", message=f"deleted {', '.join(deleted)}")

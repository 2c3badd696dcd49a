"""kopf handlers: turn each ModelDeployment into its children, keep them so, report honestly.

Level-triggered: every handler (create, update, resume), a per-object resync daemon and the
watches on the owned Deployments and worker Pods run the same ``reconcile``: parse, pre-flight,
create-or-patch every child, prune children the spec no longer wants, then write status. Running
it twice changes nothing, so re-delivered events and operator restarts are harmless. Problems of
one object become its Degraded condition and an Event; they are never raised out of the handler,
so one bad object cannot stall the others. Watching the children makes status follow a rollout
(and a pod stuck in ImagePullBackOff or CrashLoopBackOff) within a second, not at the next resync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import kopf
from tusk.operator import apply, inference_pool, preflight
from tusk.operator.desired import (
    DEFAULT_WORKER_IMAGE,
    WORKER_ROLES,
    Defaults,
    Owner,
    all_child_refs,
    child_name,
    config_selector,
    desired_children,
)
from tusk.operator.kube import ApiError, Kube, load_api_client, path_for
from tusk.operator.schema import GROUP, PLURAL, VERSION
from tusk.operator.spec import InvalidSpec, parse_spec
from tusk.operator.status import Observation, build_status, pod_problems, status_changed

RESOURCE = (GROUP, VERSION, PLURAL)
FINALIZER = "tusk.dev/cleanup"
# Children and worker pods carry these labels (desired.labels); the watches select on them.
CHILD_LABELS = {"app.kubernetes.io/managed-by": "tusk-operator"}
WORKER_POD_LABELS = {"app.kubernetes.io/name": "tusk-worker", "app.kubernetes.io/managed-by": "tusk-operator"}
# Child events arrive in bursts (every status change of a rollout): one pass per burst is enough.
CHILD_EVENT_COALESCE_S = 0.3


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
# When kopf's event loop last ran a beat (time.monotonic()); None before it starts. The liveness
# probe fails when the loop stops beating, which a separate HTTP thread could not see by itself.
last_beat: float | None = None
BEAT_SECONDS = 5.0


async def _beat() -> None:
    global last_beat
    while True:
        last_beat = time.monotonic()
        await asyncio.sleep(BEAT_SECONDS)


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


class _QuietChildEvents(logging.Filter):
    """Child events arrive with every rollout step; their "succeeded" lines would drown the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.endswith("succeeded.")
            and ("'on_child_deployment'" in message or "'on_worker_pod'" in message)
        )


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    global _runtime
    options = OPTIONS or Options.from_env()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="tusk.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="tusk.dev", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    logging.getLogger("kopf.objects").addFilter(_QuietChildEvents())
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    kube = Kube(await asyncio.to_thread(load_api_client))
    _runtime = Runtime(options, kube, preflight.NodeCapacity(kube))
    memo.beat_task = asyncio.create_task(_beat())  # kept referenced; cancelled at cleanup
    logger.info(
        "tusk operator configured: worker image %s, resync every %ss",
        options.worker_image,
        options.resync_seconds,
    )


@kopf.on.cleanup()
async def stop_beating(memo: kopf.Memo, **_: Any) -> None:
    """End the heartbeat with the operator (kopf would otherwise wait for it as a hung task)."""
    task = getattr(memo, "beat_task", None)
    if task is not None:
        task.cancel()


def _owner(body: kopf.Body) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 1))


_locks: dict[str, asyncio.Lock] = {}
# Owners being deleted: a pass that waited for the lock with an older body must not recreate
# the children the delete handler just removed.
_deleting: set[str] = set()


def _lock(owner: Owner) -> asyncio.Lock:
    """One pass at a time per ModelDeployment, whichever handler or watch started it."""
    lock = _locks.get(owner.uid)
    if lock is None:
        lock = _locks[owner.uid] = asyncio.Lock()
    return lock


def _condition_message(status: dict[str, Any] | None, kind: str, failing: str) -> str | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == failing:
            return cond.get("message")
    return None


def _degraded_message(status: dict[str, Any] | None) -> str | None:
    return _condition_message(status, "Degraded", "True")


def _warning_message(status: dict[str, Any] | None) -> str | None:
    return _condition_message(status, "Schedulable", "False")


def _is_ready(status: dict[str, Any] | None) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (status or {}).get("conditions") or []
    )


async def _write_status(kube: Kube, owner: Owner, status: dict[str, Any]) -> None:
    path = path_for("ModelDeployment", owner.namespace, owner.name) + "/status"
    await kube.call("PATCH", path, {"status": status}, "application/merge-patch+json")


async def _worker_pods(kube: Kube, owner: Owner) -> list[dict[str, Any]]:
    selector = f"tusk.dev/model={owner.name},app.kubernetes.io/name=tusk-worker"
    try:
        return await kube.list("Pod", owner.namespace, label_selector=selector)
    except ApiError as exc:
        if exc.status in (401, 403):  # an install without pod access: status says less, nothing breaks
            return []
        raise


async def _apply(
    rt: Runtime, body: kopf.Body, owner: Owner, children: list[dict[str, Any]], cause: str
) -> tuple[dict[str, dict[str, Any]], list[str], bool]:
    """Create-or-patch the children, prune what the spec no longer wants; (live, conflicts, changed)."""
    result = await apply.apply_children(rt.kube, children, owner.uid)
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    stale = [ref for ref in all_child_refs(owner) if (ref["kind"], ref["metadata"]["name"]) not in wanted]
    pruned = await apply.delete_children(rt.kube, stale, owner.uid)
    configs = {
        c["metadata"]["labels"]["tusk.dev/role"]: c["metadata"]["name"]
        for c in children
        if c["kind"] == "ConfigMap"
    }
    settled = {
        role: apply.rollout_settled(result.live.get(f"Deployment {child_name(owner.name, role)}"))
        for role in WORKER_ROLES
    }
    pruned += await apply.prune_configs(
        rt.kube, owner.namespace, config_selector(owner), owner.uid, configs, settled
    )
    if result.created:
        kopf.info(body, reason="Created", message=f"created {', '.join(result.created)}")
    if result.repaired:
        why = "Updated" if cause in ("create", "update") else "DriftRepaired"
        kopf.info(body, reason=why, message=f"patched {', '.join(result.repaired)}")
    if pruned:
        kopf.info(body, reason="Pruned", message=f"deleted {', '.join(pruned)} (no longer in use)")
    return result.live, result.conflicts, result.changed or bool(pruned)


async def reconcile(body: kopf.Body, logger: logging.Logger, cause: str) -> dict[str, Any]:
    """One level-triggered pass over one ModelDeployment; returns the status it wrote (or kept)."""
    rt = runtime()
    owner = _owner(body)
    async with _lock(owner):
        if body["metadata"].get("deletionTimestamp") or owner.uid in _deleting:
            return {}
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
                problems += preflight.name_problems(owner.name)
                problems += await preflight.check(rt.kube, rt.capacity, owner.namespace, spec)
                children: list[dict[str, Any]] = []
                if not any(p.blocking for p in problems):
                    try:
                        children = desired_children(owner, spec, rt.options.defaults())
                    except Exception as exc:  # noqa: BLE001 - the builders are pure: any failure is the spec
                        problems.append(preflight.Problem("InvalidSpec", f"{type(exc).__name__}: {exc}"))
                    if children:  # the Gateway API InferencePool, where its CRD is installed
                        children += await inference_pool.desired(rt.kube, owner)
                if any(p.blocking for p in problems) or spec.paused:
                    refs = children or all_child_refs(owner)
                    live = await apply.read_children(rt.kube, refs)
                else:
                    live, conflicts, changed = await _apply(rt, body, owner, children, cause)
                    if conflicts:
                        logger.warning("children owned by someone else: %s", conflicts)
                problems += pod_problems(await _worker_pods(rt.kube, owner))
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
        new_warning = _warning_message(status)
        if new_warning and new_warning != _warning_message(previous):
            reason = next(c["reason"] for c in status["conditions"] if c["type"] == "Schedulable")
            kopf.warn(body, reason=reason, message=new_warning)
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
async def on_resume(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, logger, "resume")


@kopf.on.create(*RESOURCE)
async def on_create(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, logger, "create")


@kopf.on.update(*RESOURCE, field="spec")
async def on_update(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    await reconcile(body, logger, "update")


_child_passes: dict[tuple[str, str], bool] = {}  # (namespace, name) -> another event came meanwhile


async def refresh_owner(namespace: str, name: str, logger: logging.Logger) -> None:
    """Re-run the owner's pass after a child changed; a burst of child events makes one pass
    (plus one more if events kept coming while it ran)."""
    key = (namespace, name)
    if key in _child_passes:
        _child_passes[key] = True
        return
    _child_passes[key] = False
    try:
        while True:
            await asyncio.sleep(CHILD_EVENT_COALESCE_S)
            _child_passes[key] = False
            owner_body = await runtime().kube.get("ModelDeployment", namespace, name)
            if owner_body is None or FINALIZER not in (owner_body["metadata"].get("finalizers") or []):
                return  # gone, or not yet taken over by the create handler
            try:
                await reconcile(kopf.Body(owner_body), logger, "child")
            except kopf.TemporaryError as exc:
                logger.warning("status refresh for %s/%s will wait for the resync: %s", namespace, name, exc)
            if not _child_passes.get(key):
                return
    finally:
        _child_passes.pop(key, None)


def _owner_name(body: kopf.Body) -> str | None:
    return (body.get("metadata", {}).get("labels") or {}).get("tusk.dev/model")


_seen: dict[str, str] = {}  # child uid -> digest of what status is computed from


async def _on_child_event(
    event: dict[str, Any], body: kopf.Body, digest: Any, logger: logging.Logger
) -> None:
    """Refresh the owner when something status depends on changed, or the child went away.

    Events that change nothing the status reads (a label edit, our own metadata patch, the replay
    of every child when the watch starts) are skipped: with many models, a pass per event would
    multiply the API calls.
    """
    uid, name = body.get("metadata", {}).get("uid") or "", _owner_name(body)
    if event.get("type") == "DELETED":
        _seen.pop(uid, None)
    else:
        text = json.dumps(digest, sort_keys=True, default=str)
        if _seen.get(uid, json.dumps(None)) == text:
            return
        _seen[uid] = text
    if name:
        await refresh_owner(body["metadata"]["namespace"], name, logger)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
async def on_child_deployment(
    event: dict[str, Any], body: kopf.Body, logger: logging.Logger, **_: Any
) -> None:
    """A rollout moved (or someone edited or deleted a child): report and repair now."""
    status = dict(body.get("status") or {})
    generation = body.get("metadata", {}).get("generation")
    await _on_child_event(event, body, [generation, status] if status else None, logger)


@kopf.on.event("", "v1", "pods", labels=WORKER_POD_LABELS)
async def on_worker_pod(event: dict[str, Any], body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Worker pods failing (image pull, crash loop, config error) show up as Degraded at once."""
    status = body.get("status") or {}
    containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    digest = [
        [(c.get("name"), sorted(((c.get("state") or {}).get("waiting") or {}).items())) for c in containers],
        [(c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or []],
    ]
    await _on_child_event(event, body, digest if any(digest) else None, logger)


async def _sleep_unless_stopped(stopped: kopf.DaemonStopped, seconds: float) -> None:
    # Short naps instead of stopped.wait(timeout): that helper leaves a timer task behind when the
    # daemon is cancelled at shutdown, which surfaced as a TimeoutError from the operator.
    deadline = asyncio.get_running_loop().time() + seconds
    while not stopped:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.2))


# The daemon ends by itself within a nap once stopped; kopf cancels only after the backoff (a
# cancelled daemon is re-invoked once and held the operator's shutdown for the whole timeout).
@kopf.daemon(*RESOURCE, cancellation_backoff=1.0, cancellation_timeout=5.0)
async def resync(stopped: kopf.DaemonStopped, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Drift repair and status refresh: children change without touching the ModelDeployment."""
    while not stopped:
        await _sleep_unless_stopped(stopped, runtime().options.resync_seconds)
        if stopped:
            break
        try:
            await reconcile(body, logger, "resync")
        except kopf.TemporaryError as exc:
            logger.warning("resync will retry: %s", exc)
        except Exception:  # noqa: BLE001 - keep the loop alive; the next pass retries
            logger.exception("resync failed")


@kopf.on.delete(*RESOURCE, optional=True)  # the resync daemon already holds the finalizer
async def on_delete(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    """Delete children explicitly: works without a garbage collector and reports what went."""
    rt = runtime()
    owner = _owner(body)
    _deleting.add(owner.uid)
    async with _lock(owner):  # after any pass in flight, so it cannot recreate what goes now
        try:
            deleted = await apply.delete_children(rt.kube, all_child_refs(owner), owner.uid)
            deleted += await inference_pool.delete(rt.kube, owner)
            selector = config_selector(owner)
            for config in await rt.kube.list("ConfigMap", owner.namespace, label_selector=selector):
                if apply.owned_by(config, owner.uid) and await rt.kube.delete(
                    "ConfigMap", owner.namespace, config["metadata"]["name"]
                ):
                    deleted.append(f"ConfigMap {config['metadata']['name']}")
        except ApiError as exc:
            raise kopf.TemporaryError(f"deleting children: {exc}", delay=5) from None
    _locks.pop(owner.uid, None)
    if deleted:
        kopf.info(body, reason="Deleted", message=f"deleted {', '.join(deleted)}")

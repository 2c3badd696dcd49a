"""Lease-based leader election (coordination.k8s.io/v1), as client-go's leaderelection does it.

kopf's own peering gives every replica the same priority and then pauses them all, so several
``tusk operator`` replicas elect one leader through a Lease instead: the leader renews
``renewTime`` every ``retry_period``; a candidate takes the Lease over once the record it observed
has not changed for ``lease_duration`` (judged on its own clock, so skewed clocks do not matter),
or at once when the holder released it. Every write is an update (PUT) of the whole Lease with the
resourceVersion it read, so two candidates can never both win: the server answers the slower one
409. (RBAC: get, create and update on leases, in the election namespace only.) A leader that cannot renew
within ``renew_deadline`` stops leading (the process exits and restarts as a candidate), which is
shorter than ``lease_duration``, so no two replicas ever act as leader at the same time.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from tusk.operator.kube import ApiError, Kube, path_for

log = logging.getLogger("tusk.operator.leader")


@dataclass(frozen=True)
class ElectionConfig:
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0  # client-go's defaults
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration")


def micro_time(now: float | None = None) -> str:
    """A MicroTime as the API server writes it."""
    moment = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Blocking election on a thread of its own; the kopf event loop never waits on it."""

    def __init__(self, kube: Kube, config: ElectionConfig) -> None:
        self.kube, self.config = kube, config
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, resourceVersion)
        self._observed_at = 0.0  # monotonic time the observed record last changed
        self.leading = threading.Event()

    def _path(self, name: str | None = None) -> str:
        return path_for("Lease", self.config.namespace, name)

    def _record(self, transitions: int, acquired: str | None = None) -> dict[str, Any]:
        now = micro_time()
        return {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.config.lease_duration)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        try:
            lease = self.kube._call("GET", self._path(self.config.name))
        except ApiError as exc:
            if exc.status != 404:
                log.warning("reading Lease %s/%s: %s", self.config.namespace, self.config.name, exc)
                return False
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                "spec": self._record(0),
            }
            try:
                self.kube._call("POST", self._path(), body)
            except ApiError as create_error:
                if create_error.status != 409:
                    log.warning("creating Lease: %s", create_error)
                return False
            return True
        spec = lease.get("spec") or {}
        meta = lease.get("metadata") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, spec.get("renewTime"), meta.get("resourceVersion"))
        if observed != self._observed:
            self._observed, self._observed_at = observed, time.monotonic()
        mine = holder == self.config.identity
        duration = float(spec.get("leaseDurationSeconds") or self.config.lease_duration)
        if not mine and holder and time.monotonic() - self._observed_at < duration:
            return False  # someone else holds a live lease
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        # The resourceVersion read above makes the update conditional: a concurrent writer gets 409.
        lease["spec"] = {**spec, **self._record(transitions, spec.get("acquireTime") if mine else None)}
        try:
            self.kube._call("PUT", self._path(self.config.name), lease)
        except ApiError as exc:
            if exc.status != 409:
                log.warning("updating Lease: %s", exc)
            return False
        if not mine:
            log.info("took over Lease %s/%s from %r", self.config.namespace, self.config.name, holder)
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Wait until this candidate leads (True) or ``stop`` is set (False)."""
        log.info(
            "standby: waiting for leadership (Lease %s/%s, identity %s)",
            self.config.namespace,
            self.config.name,
            self.config.identity,
        )
        while not stop.is_set():
            if self.try_acquire_or_renew():
                self.leading.set()
                log.info("leader: this replica now reconciles (identity %s)", self.config.identity)
                return True
            stop.wait(self.config.retry_period)
        return False

    def renew_until_lost(self, stop: threading.Event) -> bool:
        """Renew every retry period; returns False when leadership was lost, True when stopped."""
        last_renewed = time.monotonic()
        while not stop.wait(self.config.retry_period):
            if self.try_acquire_or_renew():
                last_renewed = time.monotonic()
            elif time.monotonic() - last_renewed > self.config.renew_deadline:
                self.leading.clear()
                log.error(
                    "leader: could not renew the Lease within %ss; stepping down", self.config.renew_deadline
                )
                return False
        return True

    def release(self) -> None:
        """Hand the Lease back on a clean stop, so a standby takes over at once."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        try:
            lease = self.kube._call("GET", self._path(self.config.name))
            if (lease.get("spec") or {}).get("holderIdentity") != self.config.identity:
                return
            lease["spec"].update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time())
            self.kube._call("PUT", self._path(self.config.name), lease)
            log.info("leader: released Lease %s/%s", self.config.namespace, self.config.name)
        except ApiError as exc:
            log.warning("releasing Lease: %s", exc)

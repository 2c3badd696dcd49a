"""Several ``tusk operator --leader-elect`` processes against the emulator: exactly one reconciles,
the others stand by (log and /readyz say so), and killing the leader hands over to another."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from operator_harness import Cluster, eventually
from tusk.operator.kube import ApiError

from tusk.kvserver import free_port

# Short leases so a hand-over takes seconds (the defaults are 15/10/2 s, as client-go's).
LEASE = ["--leader-election-lease-duration", "2", "--leader-election-renew-deadline", "1.5"]
LEASE += ["--leader-election-retry-period", "0.3"]
SPEC = {"model": {"source": "tiny"}, "kvTier": {}}


def _readiness(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class Replica:
    def __init__(self, index: int, tmp: Path) -> None:
        # Each replica has its own token, so the emulator can tell who wrote what.
        self.token, self.pod = f"replica-{index}", f"operator-{index}"
        config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
        config["users"][0]["user"]["token"] = self.token
        self.kubeconfig = tmp / f"kubeconfig-{index}"
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = tmp / f"replica-{index}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tusk.operator",
                "--leader-elect",
                "--leader-election-namespace",
                "tusk-system",
                "--all-namespaces",
                "--health-port",
                str(self.port),
                "--resync-seconds",
                "1",
                "--worker-image",
                "tusk:ha",
                *LEASE,
            ],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_NAME": self.pod},
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )

    def readiness(self) -> tuple[int, str]:
        return _readiness(self.port) if self.process.poll() is None else (0, "")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Waits off the event loop: the emulator serves from it, and the operator's last calls
        must be answered for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return await asyncio.to_thread(self.process.wait, timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return await asyncio.to_thread(self.process.wait)


def _leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.readiness()[0] == 200]


def _writers(cluster: Cluster, resource: str) -> set[str]:
    return {token for _, res, _, _, token in cluster.emulator.writes if res == resource}


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
async def test_one_leader_reconciles_and_a_standby_takes_over(
    cluster: Cluster, tmp_path: Path, count: int
) -> None:
    replicas = [Replica(i, tmp_path) for i in range(count)]
    try:
        (leader,) = await eventually(
            lambda: (found := _leaders(replicas)) and len(found) == 1 and found, timeout=60, what="a leader"
        )
        standbys = [r for r in replicas if r is not leader]
        await eventually(
            lambda: all(r.readiness()[0] == 503 for r in standbys), timeout=30, what="standbys answer 503"
        )
        for standby in standbys:
            assert "standby: waiting for leadership" in standby.readiness()[1]
            await eventually(
                lambda s=standby: "standby: waiting for leadership" in s.log.read_text(), what="standby log"
            )

        await cluster.create_md("first", SPEC)
        await eventually(lambda: cluster.deployment("first-decode"), timeout=30, what="leader reconciled")
        await asyncio.sleep(1.5)  # a resync or two: standbys would have written by now
        assert _writers(cluster, "apps/v1/deployments") == {leader.token}
        assert len(_leaders(replicas)) == 1

        # The leader dies without releasing its Lease: a standby takes over once it expires.
        killed_at = time.monotonic()
        assert await leader.stop(signal.SIGKILL) == -signal.SIGKILL
        (successor,) = await eventually(
            lambda: (found := _leaders(standbys)) and len(found) == 1 and found,
            timeout=60,
            what="a successor",
        )
        handover = time.monotonic() - killed_at
        assert handover < 30, handover  # a few 2 s lease durations; generous for a loaded machine
        await cluster.create_md("second", SPEC)
        await eventually(lambda: cluster.deployment("second-decode"), timeout=30, what="successor reconciled")
        second_writers = {
            token
            for _, res, _, name, token in cluster.emulator.writes
            if res == "apps/v1/deployments" and name and name.startswith("second-")
        }
        assert second_writers == {successor.token}
        lease = cluster.get("coordination.k8s.io/v1/leases", "tusk-system", "tusk-operator")
        assert lease["spec"]["holderIdentity"].startswith("operator-")
        assert lease["spec"]["leaseTransitions"] >= 1

        # A clean stop hands the Lease back at once (to nobody, or straight to the last standby).
        assert await successor.stop() == 0
        holder = cluster.get("coordination.k8s.io/v1/leases", "tusk-system", "tusk-operator")["spec"][
            "holderIdentity"
        ]
        assert not holder.startswith(successor.pod + "_")
    finally:
        codes = [await replica.stop() for replica in replicas]
    assert all(code in (0, -signal.SIGKILL) for code in codes), [r.log.read_text()[-1500:] for r in replicas]


async def test_two_candidates_never_both_win(cluster: Cluster) -> None:
    """The election's rules, step by step: only one holder, takeover only after the lease expires
    (on the candidate's own clock), a stale write is refused (409), a released lease is free."""
    from tusk.operator.kube import Kube, load_api_client
    from tusk.operator.leader import ElectionConfig, LeaderElector

    kube = Kube(await asyncio.to_thread(load_api_client))
    config = ElectionConfig("ha", "lock", "a", lease_duration=3, renew_deadline=2, retry_period=0.5)
    a = LeaderElector(kube, config)
    b = LeaderElector(kube, replace(config, identity="b"))
    assert await asyncio.to_thread(a.try_acquire_or_renew)  # creates the Lease
    assert not await asyncio.to_thread(b.try_acquire_or_renew)  # held and fresh
    assert await asyncio.to_thread(a.try_acquire_or_renew)  # renews

    # b has watched the record stay unchanged for longer than the lease: it takes over.
    b._observed_at -= 10
    assert not await asyncio.to_thread(b.try_acquire_or_renew)  # a renewed meanwhile: a new record
    b._observed_at -= 10
    assert await asyncio.to_thread(b.try_acquire_or_renew)
    lease = cluster.get("coordination.k8s.io/v1/leases", "ha", "lock")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
    # a now sees b's fresh record and stays out.
    assert not await asyncio.to_thread(a.try_acquire_or_renew)

    # Two writers from the same read: the second is refused by its resourceVersion.
    stale = await asyncio.to_thread(
        kube._call, "GET", "/apis/coordination.k8s.io/v1/namespaces/ha/leases/lock"
    )
    await asyncio.to_thread(
        kube._call, "PUT", "/apis/coordination.k8s.io/v1/namespaces/ha/leases/lock", stale
    )
    with pytest.raises(ApiError) as refused:
        await asyncio.to_thread(
            kube._call, "PUT", "/apis/coordination.k8s.io/v1/namespaces/ha/leases/lock", stale
        )
    assert refused.value.status == 409

    # A release hands it over at once.
    b.leading.set()
    await asyncio.to_thread(b.release)
    assert cluster.get("coordination.k8s.io/v1/leases", "ha", "lock")["spec"]["holderIdentity"] == ""
    assert await asyncio.to_thread(a.try_acquire_or_renew)

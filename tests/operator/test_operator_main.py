"""``python -m tusk.operator`` as a real process: namespace scope, health endpoint, clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from operator_harness import Cluster, eventually

from tusk.kvserver import free_port


def _healthy(port: int, path: str = "/healthz") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("scope", [["--all-namespaces"], ["--namespace", "team-a"]])
async def test_operator_process_reconciles_its_scope_and_stops_cleanly(
    cluster: Cluster, scope: list[str]
) -> None:
    # Objects first: the emulated namespace list is derived from existing objects.
    await cluster.create_md("mine", {"model": {"source": "tiny"}}, namespace="team-a")
    await cluster.create_md("theirs", {"model": {"source": "tiny"}}, namespace="team-b")
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tusk.operator",
            "--standalone",
            *scope,
            "--health-port",
            str(port),
            "--resync-seconds",
            "1",
            "--worker-image",
            "tusk:e2e",
        ],
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await eventually(
            lambda: _healthy(port) or process.poll() is not None, timeout=60, what="health endpoint"
        )
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        deployment = await eventually(
            lambda: cluster.deployment("mine-decode", "team-a"), timeout=60, what="reconciled"
        )
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "tusk:e2e"
        await eventually(lambda: _healthy(port, "/readyz"), timeout=30, what="ready (no election: alone)")
        if "--all-namespaces" in scope:
            await eventually(lambda: cluster.deployment("theirs-decode", "team-b"), timeout=60, what="team-b")
        else:
            await asyncio.sleep(2)
            assert cluster.deployment("theirs-decode", "team-b") is None
            assert (cluster.md("theirs", "team-b") or {}).get("status") is None
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            out, err = await asyncio.to_thread(process.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    assert out == b""  # logs go to stderr


def test_help_lists_the_modes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tusk.operator", "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--namespace",
        "--all-namespaces",
        "--standalone",
        "--leader-elect",
        "--leader-election-namespace",
        "--leader-election-name",
        "--peering-name",
        "--health-port",
    ):
        assert flag in result.stdout


async def test_a_named_peering_that_does_not_exist_is_an_error_not_a_silent_pause(cluster: Cluster) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tusk.operator", "--peering-name", "nobody", "--health-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "peering 'nobody' not found" in line and "--leader-elect" in line


async def test_leader_election_needs_a_namespace(cluster: Cluster, monkeypatch) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tusk.operator", "--leader-elect", "--health-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tusk operator: --leader-elect needs --leader-election-namespace (or POD_NAMESPACE)"
    )


def test_liveness_fails_when_kopfs_loop_stops_beating(monkeypatch) -> None:
    import time

    from tusk.operator import handlers
    from tusk.operator.main import Health

    health = Health()
    monkeypatch.setattr(handlers, "last_beat", None)
    assert health.liveness()[0] == 200  # not started yet
    monkeypatch.setattr(handlers, "last_beat", time.monotonic())
    assert health.liveness()[0] == 200
    monkeypatch.setattr(handlers, "last_beat", time.monotonic() - 120)
    code, text = health.liveness()
    assert code == 503 and "event loop" in text
    assert health.readiness()[0] == 503  # kopf not ready
    health.kopf_ready.set()
    health.state = "standby"
    assert health.readiness() == (503, "standby: waiting for leadership\n")
    health.state = "leader"
    assert health.readiness()[0] == 200

"""Fixtures for the operator tests: an emulated API server and the real operator against it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml
from kube_emulator import ClusterEmulator, declare_resources
from operator_harness import Cluster, OperatorThread
from tusk.operator import handlers


@pytest_asyncio.fixture
async def cluster(tmp_path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        url = str(server.url).rstrip("/")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emu", "cluster": {"server": url}}],
            "users": [{"name": "emu", "user": {"token": "test"}}],
            "contexts": [
                {"name": "emu", "context": {"cluster": "emu", "user": "emu", "namespace": "default"}}
            ],
            "current-context": "emu",
        }
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        async with aiohttp.ClientSession(base_url=url) as session:
            yield Cluster(emulator, session)


@pytest.fixture
def options() -> handlers.Options:
    return handlers.Options(
        worker_image="tusk-test:1", router_url="http://router.test/v1", resync_seconds=0.5
    )


@pytest_asyncio.fixture
async def operator(cluster: Cluster, options: handlers.Options) -> AsyncIterator[OperatorThread]:
    runner = OperatorThread(options)
    await runner.start()
    yield runner
    await runner.stop()

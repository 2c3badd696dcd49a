"""Router test harness: fake gRPC workers and the real router, both served from one background
event loop, so tests can use blocking clients (the official ``openai`` SDK, httpx) as well as
async ones against real loopback sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from router_fake_worker import FakeWorker, FakeWorkerState, start_fake_worker
from tusk.router.app import Router, RouterOptions, _bind, build_server
from tusk.router.tokenizer import ModelTokenizer

from tusk.config import ModelRoute, Role, RouterConfig, RoutingConfig, WorkerEndpoint

T = TypeVar("T")
MODEL = "tiny"
REPLY = "Hello from tusk: héllo 🦀 世界, done."


class Harness:
    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.tokenizer = ModelTokenizer.from_dir(tokenizer_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.workers: list[FakeWorker] = []
        self._servers: list[Any] = []
        self._routers: list[Router] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def script(self, text: str = REPLY) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def worker(self, role: str = "both", **knobs: Any) -> tuple[FakeWorker, WorkerEndpoint]:
        async def start() -> tuple[FakeWorker, str]:
            knobs.setdefault("script", self.script())
            state = FakeWorkerState(worker_id=f"w{len(self.workers)}", role=role, **knobs)
            return await start_fake_worker(state)

        servicer, address = self.run(start())
        self.workers.append(servicer)
        return servicer, WorkerEndpoint(address=address, role=Role(role))

    def kill(self, worker: FakeWorker) -> None:
        assert worker.server is not None
        self.run(worker.server.stop(None))

    def router(
        self,
        workers: list[WorkerEndpoint],
        policy: str = "round_robin",
        wait_ready: bool = True,
        **settings: Any,
    ) -> tuple[Router, str]:
        routing = settings.pop("routing", None) or RoutingConfig(policy=policy, allow_policy_header=True)
        config = RouterConfig(
            port=0,
            models=[ModelRoute(name=MODEL, tokenizer=str(self.tokenizer_dir), workers=workers)],
            routing=routing,
            **settings,
        )
        router = Router(config, RouterOptions(poll_interval_s=0.1))

        async def start() -> str:
            sock = _bind("127.0.0.1", 0)
            await router.start()
            server = build_server(router, drain_timeout=2)
            self._servers.append((server, router))
            asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
            while not server.started:
                await asyncio.sleep(0.01)
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

        url = self.run(start())
        self._routers.append(router)
        if wait_ready:
            deadline = time.monotonic() + 10
            while httpx.get(f"{url}/health").status_code != 200:
                assert time.monotonic() < deadline, "router never became ready"
                time.sleep(0.05)
        return router, url

    def close(self) -> None:
        async def stop() -> None:
            for server, _ in self._servers:
                server.should_exit = True
            await asyncio.sleep(0.05)
            for _, router in self._servers:
                await router.stop()
            for worker in self.workers:
                if worker.server is not None:
                    await worker.server.stop(None)

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture
def harness(tiny_model: Path) -> Iterator[Harness]:
    h = Harness(tiny_model)
    yield h
    h.close()


@pytest.fixture
def two_worker_router(harness: Harness) -> tuple[Harness, list[FakeWorker], str]:
    a, ea = harness.worker()
    b, eb = harness.worker()
    _, url = harness.router([ea, eb])
    return harness, [a, b], url

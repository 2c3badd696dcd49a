"""Health tracking of one worker: definitive failures count at once, slow answers only when
they repeat."""

from __future__ import annotations

from router_fake_worker import FakeWorkerState, start_fake_worker
from tusk.router.workers import SLOW_POLLS_TO_FAIL, WorkerClient

from tusk.config import Role


async def test_slow_health_answers_fail_only_when_repeated() -> None:
    state = FakeWorkerState(script=[1, 2, 3])
    servicer, address = await start_fake_worker(state)
    client = WorkerClient(address, Role.BOTH, rpc_timeout_s=0.2)
    try:
        await client.poll_once()
        assert client.state.healthy and client.worker_id == "fake" and client.state.free_blocks == 1000
        state.health_delay_s = 0.5
        for _ in range(SLOW_POLLS_TO_FAIL - 1):
            await client.poll_once()
            assert client.state.healthy  # a busy worker may miss a deadline
        await client.poll_once()
        assert not client.state.healthy
        state.health_delay_s = 0.0
        await client.poll_once()
        assert client.state.healthy
        state.serving = False  # draining / not serving: out at once
        await client.poll_once()
        assert not client.state.healthy
        state.serving = True
        await client.poll_once()
        assert client.state.healthy
        await servicer.server.stop(None)  # refused connection: out at once
        await client.poll_once()
        assert not client.state.healthy
    finally:
        await client.close()

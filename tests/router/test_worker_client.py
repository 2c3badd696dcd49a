"""Health tracking of one worker: definitive failures count at once, slow answers only when
they repeat."""

from __future__ import annotations

from conftest import MODEL
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


def test_a_worker_back_from_unhealthy_gets_its_prefix_index_entries_back(harness) -> None:
    """Being marked unhealthy wipes a worker's index entries (it may have restarted empty); when
    it answers again the router subscribes anew and the snapshot restores what it still holds."""
    import time

    import httpx
    from tusk.router.registry import ModelRuntime

    from tusk.config import RoutingConfig
    from tusk.hashing import block_hashes

    worker, endpoint = harness.worker(kv_snapshot=True)
    router, url = harness.router([endpoint], routing=RoutingConfig(policy="cache_aware"))
    runtime: ModelRuntime = router.registry.get(MODEL)
    prompt = "tell me a long story about " * 8
    assert (
        httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
        ).status_code
        == 200
    )
    hashes = block_hashes(list(worker.s.generate_calls[0].prompt_token_ids), 16)
    assert len(hashes) >= 2

    def wait(pred, what: str) -> None:
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    wait(lambda: runtime.index.match(hashes) == {"w0": len(hashes)}, "the KV events never arrived")
    worker.s.serving = False
    wait(lambda: not runtime.can_serve(), "never marked unhealthy")
    assert runtime.index.match(hashes) == {}
    worker.s.serving = True
    wait(lambda: runtime.index.match(hashes) == {"w0": len(hashes)}, "the entries never came back")
    assert worker.s.subscriptions == 2

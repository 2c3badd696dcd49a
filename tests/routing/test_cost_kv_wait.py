"""``cost`` counts the KV blocks that requests routed earlier already wait for on a worker: a
worker admits in order, so a request behind them waits for their blocks too."""

from __future__ import annotations

from tusk.router.load_account import WorkerLoad
from tusk.router.policies import make_policy
from tusk.router.policies.base import RoutingRequest, WorkerState
from tusk.router.prefix_index import PrefixIndex

BS = 16


def test_a_worker_whose_kv_is_overcommitted_loses_its_cache_advantage() -> None:
    index = PrefixIndex()
    hashes = list(range(1, 257))  # 256 blocks = 4096 prompt tokens
    index.apply_event("holder", "stored", "device", hashes[:250])
    policy = make_policy("cost", index, claim_routes=False, default_prefill_tokens_per_s=10_000.0)

    def states(overcommit_requests: int) -> list[WorkerState]:
        holder = WorkerState(
            "holder", "a", total_blocks=400, prefill_tokens_per_s=10_000.0, decode_step_s=0.02
        )
        other = WorkerState("other", "b", total_blocks=400, prefill_tokens_per_s=10_000.0, decode_step_s=0.02)
        holder_load, other_load = WorkerLoad(holder), WorkerLoad(other)
        other_load.charge(0, False, 0)
        holder_load.charge(0, False, 350)  # running requests hold 350 of 400 blocks
        for _ in range(overcommit_requests):  # routed there, waiting for KV to start
            holder_load.charge(0, True, 100)
        return [holder, other]

    request = RoutingRequest("r", hashes, prompt_tokens=256 * BS, block_size=BS, max_tokens=32)
    # short of KV already, but nobody else is waiting: the cached prefix still wins
    calm = states(0)
    assert calm[0].kv_overcommit_blocks == 0
    assert policy.route(request, calm).decode.worker_id == "holder"
    # ten requests already wait there for 1000 blocks: recomputing elsewhere is faster
    jammed = states(10)
    assert jammed[0].free_blocks == 0 and jammed[0].kv_overcommit_blocks == 950
    decision = policy.route(request, jammed)
    assert decision.decode.worker_id == "other"
    assert decision.scores["holder"] > decision.scores["other"]

"""The router's admission queue (tusk.router.admission): who waits, who goes first, and that the
live gate and the simulator use it the same way."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from tusk.router.admission import AdmissionGate, AdmissionQueue, QueueFull
from tusk.router.load_account import WorkerLoad
from tusk.router.policies.base import WorkerState
from tusk.router.sim.cluster import SimConfig, Simulator
from tusk.router.sim.profile import WorkerProfile, load_profile
from tusk.router.sim.trace import load_trace

from tusk import emulate
from tusk.config import AdmissionConfig, Role, RoutingConfig

# a slice of the Mooncake trace committed with the tests (tests/data/traces/README.md)
TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "mooncake_synthetic_tail400.jsonl"


def worker(queued: int, role: Role = Role.BOTH, healthy: bool = True, rate: float = 1000.0) -> WorkerState:
    return WorkerState(
        worker_id=f"w{queued}{role}",
        address="a",
        role=role,
        healthy=healthy,
        queued_prefill_tokens=queued,
        prefill_tokens_per_s=rate,
    )


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def queue(clock: Clock | None = None, **kw: float) -> AdmissionQueue:
    cfg = AdmissionConfig(**kw)
    return AdmissionQueue.from_config(cfg, default_prefill_tokens_per_s=1000.0, clock=clock or Clock())


def test_room_means_some_worker_that_can_prefill_is_nearly_idle() -> None:
    q = queue(backlog_s=0.5)  # 500 tokens at 1000 tokens/s
    assert q.has_room([worker(499)])
    assert not q.has_room([worker(500), worker(9000)])
    assert q.has_room([worker(9000), worker(100, Role.PREFILL)])
    # unhealthy workers give no room; a decode worker does (it can prefill for itself)
    assert not q.has_room([worker(9000), worker(0, healthy=False)])
    assert q.has_room([worker(9000, Role.PREFILL), worker(0, Role.DECODE)])
    # no healthy worker at all: nothing to wait for, routing answers 503 at once
    assert q.has_room([]) and q.has_room([worker(0, healthy=False)])


def test_requests_go_straight_through_while_there_is_room() -> None:
    q = queue()
    assert q.offer("a", 5.0, [worker(0)]) is None
    assert len(q) == 0 and q.admitted_at_once == 1


def test_cheapest_work_goes_first_and_waiting_ages_a_long_prompt_forward() -> None:
    clock = Clock()
    q = queue(clock, aging=0.5)
    busy, idle = [worker(10_000)], [worker(0)]
    assert q.offer("long", 10.0, busy) is not None
    clock.t = 4.0
    assert q.offer("short", 1.0, busy) is not None
    clock.t = 30.0  # 30 s later "long" has aged 15 s of work, more than the 9 s between them...
    assert q.offer("newer-short", 1.0, busy) is not None
    assert q.pop_next(busy) is None  # nobody has room: nothing is released
    # ... but not past "short", which arrived 4 s later with 9 s less work
    assert [q.pop_next(idle) for _ in range(3)] == ["short", "long", "newer-short"]
    assert q.pop_next(idle) is None


def test_a_newcomer_never_jumps_a_non_empty_queue() -> None:
    q = queue()
    assert q.offer("first", 3.0, [worker(10_000)]) is not None
    # room now, but someone is waiting: the newcomer is ranked with it, not admitted past it
    assert q.offer("second", 0.1, [worker(0)]) is not None
    assert len(q) == 2


def test_withdrawn_requests_are_never_released_and_the_queue_is_bounded() -> None:
    q = queue(max_waiting=2)
    busy = [worker(10_000)]
    a = q.offer("a", 1.0, busy)
    assert q.offer("b", 2.0, busy) is not None
    with pytest.raises(QueueFull):
        q.offer("c", 3.0, busy)
    assert a is not None
    q.withdraw(a)
    q.withdraw(a)  # twice is harmless
    assert len(q) == 1
    assert q.pop_next([worker(0)]) == "b"
    assert q.pop_next([worker(0)]) is None and len(q) == 0


def test_backlog_zero_turns_admission_off() -> None:
    q = queue(backlog_s=0)
    assert not q.enabled
    assert q.offer("a", 9.0, [worker(10**9)]) is None


def test_bad_settings_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="aging"):
        RoutingConfig(admission={"aging": 0})
    with pytest.raises(ValueError, match="max_waiting"):
        RoutingConfig(admission={"max_waiting": 0})
    with pytest.raises(ValueError, match="backlog_s"):
        RoutingConfig(admission={"backlog_s": -1})
    with pytest.raises(ValueError, match="unknown|extra"):
        RoutingConfig(admission={"backlog": 1})


# ------------------------------------------------------------------------------- live gate


def busy_gate() -> tuple[WorkerState, AdmissionGate]:
    """A gate in front of one worker with far more than its backlog queued: requests wait."""
    state = worker(10**6)
    return state, AdmissionGate(queue(), lambda: [state])


def test_the_gate_routes_waiting_requests_as_load_goes_down_least_work_first() -> None:
    async def scenario() -> None:
        state = WorkerState(worker_id="w", address="a", prefill_tokens_per_s=1000.0)
        load = WorkerLoad(state)
        gate = AdmissionGate(queue(backlog_s=0.5), lambda: [state])
        load.on_change = gate.pump
        load.charge(5000, True, 10)  # 5 s of prefill queued: no room
        routed: list[str] = []

        def route(name: str, tokens: int):  # what dispatch's _route does: decide and charge
            def go() -> str:
                routed.append(name)
                load.charge(tokens, True, 10)
                return f"decision-{name}"

            return go

        waiting = [
            asyncio.create_task(gate.enter(work, 30.0, route(name, 5000)))
            for name, work in (("long", 5.0), ("short", 1.0), ("mid", 2.0))
        ]
        await asyncio.sleep(0.01)
        assert routed == [] and len(gate.queue) == 3
        # the prefill is done: room for one; the least work is routed there and then, which
        # takes the room away again, so the other two keep waiting
        load.prefill_finished(5000, 10)
        assert routed == ["short"]
        await asyncio.sleep(0.01)
        assert waiting[1].result() == "decision-short" and not waiting[0].done()
        load.prefill_finished(5000, 10)
        load.prefill_finished(5000, 10)
        assert routed == ["short", "mid", "long"]
        assert await asyncio.gather(*waiting) == ["decision-long", "decision-short", "decision-mid"]
        # with room, enter returns None: the caller routes by itself
        load.prefill_finished(5000, 10)
        assert await gate.enter(1.0, 30.0, route("x", 0)) is None and routed[-1] == "long"

    asyncio.run(scenario())


def test_a_routing_error_reaches_the_waiting_request_and_the_queue_goes_on() -> None:
    async def scenario() -> None:
        state, gate = busy_gate()

        def fails() -> str:
            raise LookupError("no worker")

        bad = asyncio.create_task(gate.enter(1.0, 30.0, fails))
        good = asyncio.create_task(gate.enter(2.0, 30.0, lambda: "ok"))
        await asyncio.sleep(0.01)
        state.queued_prefill_tokens = 0
        gate.pump()
        with pytest.raises(LookupError):
            await bad
        assert await good == "ok"

    asyncio.run(scenario())


def test_a_request_that_times_out_or_is_cancelled_leaves_the_queue() -> None:
    async def scenario() -> None:
        state, gate = busy_gate()
        never = []
        with pytest.raises(TimeoutError):
            await gate.enter(1.0, 0.05, lambda: never.append(1))
        assert len(gate.queue) == 0
        task = asyncio.create_task(gate.enter(1.0, 30.0, lambda: never.append(1)))
        await asyncio.sleep(0.01)
        assert len(gate.queue) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(gate.queue) == 0
        state.queued_prefill_tokens = 0
        gate.pump()
        assert never == []  # neither was routed after it left

    asyncio.run(scenario())


# ------------------------------------------------------------------------------- simulator


def _run(
    trace: list, admission: dict | None, load: float, profile: WorkerProfile | None = None
) -> tuple[Simulator, dict]:
    profile = profile or load_profile("h100-llama8b").scaled(16)
    cfg = SimConfig(policy="cost", workers=4, block_size=4, load_scale=load, admission=admission)
    sim = Simulator(trace, cfg, profile)
    return sim, sim.run()


def test_simulated_queue_cuts_p90_ttft_under_overload_and_loses_no_request() -> None:
    trace = load_trace(TRACE, block_size=4, token_scale=16, max_requests=300)
    on = AdmissionConfig().model_dump()
    sim_on, with_queue = _run(trace, on, load=2.0)
    _, fcfs = _run(trace, None, load=2.0)
    assert with_queue["completed"] == fcfs["completed"] == len(trace)
    assert sim_on.admission is not None and sim_on.admission.held > 0 and len(sim_on.admission) == 0
    assert with_queue["ttft_p90_s"] < 0.8 * fcfs["ttft_p90_s"]
    # unloaded, nobody ever waits and the result is FCFS's
    sim_light, light = _run(trace, on, load=0.02)
    assert sim_light.admission is not None and sim_light.admission.held == 0
    assert light["ttft_p90_s"] == pytest.approx(_run(trace, None, load=0.02)[1]["ttft_p90_s"])


def test_a_request_longer_than_the_kv_cache_is_refused_not_parked() -> None:
    profile = replace(load_profile("h100-llama8b").scaled(16), kv_capacity_tokens=4000)
    limit = profile.max_model_len(4)
    trace = load_trace(TRACE, block_size=4, token_scale=16, max_requests=300)
    too_long = sum(r.input_tokens + r.output_tokens > limit for r in trace)
    assert too_long > 0
    _, m = _run(trace, None, load=0.5, profile=profile)
    assert m["rejected"] == too_long and m["completed"] == len(trace) - too_long
    assert emulate.context_error(limit - 10, 10, limit) is None
    assert "maximum context length is 4000" in (emulate.context_error(limit - 10, 11, limit) or "")

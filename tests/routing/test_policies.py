"""Each routing policy's contract: who it picks, how it fails, and the cost policy's
per-request conditional disaggregation and learnt (reported) threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
from tusk.router.policies import (
    POLICY_NAMES,
    CostPolicy,
    NoWorkerAvailable,
    RequestOutcome,
    RoutingDecision,
    RoutingRequest,
    WorkerState,
    make_policy,
)
from tusk.router.prefix_index import PrefixIndex
from tusk.router.sim.cluster import SimConfig, Simulator
from tusk.router.sim.profile import load_profile
from tusk.router.sim.trace import load_trace

from tusk.config import Role

# slices of the public traces committed with the tests (tests/data/traces/README.md)
TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"

BS = 16


def worker(wid: str, role: Role = Role.BOTH, **load: object) -> WorkerState:
    state = WorkerState(worker_id=wid, address=f"{wid}:1", role=role, free_blocks=1000, total_blocks=1000)
    for k, v in load.items():
        setattr(state, k, v)
    return state


def request(hashes: list[int], tokens: int | None = None, session: str | None = None) -> RoutingRequest:
    return RoutingRequest(
        request_id="r",
        block_hashes=hashes,
        prompt_tokens=tokens if tokens is not None else len(hashes) * BS + 3,
        block_size=BS,
        session_key=session,
    )


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_raises_when_nobody_healthy_can_decode(name: str) -> None:
    policy = make_policy(name, PrefixIndex(), seed=1)
    with pytest.raises(NoWorkerAvailable):
        policy.route(request([1]), [])
    with pytest.raises(NoWorkerAvailable):
        policy.route(request([1]), [worker("a", healthy=False), worker("p", Role.PREFILL)])


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_skips_unhealthy_and_aggregates_without_prefill_workers(name: str) -> None:
    policy = make_policy(name, PrefixIndex(), seed=1)
    workers = [worker("sick", healthy=False), worker("ok")]
    for i in range(5):
        d = policy.route(request([i + 1], session=str(i)), workers)
        assert d.decode.worker_id == "ok"
        assert d.prefill is None
        policy.observe(
            RequestOutcome(decision=d, prompt_tokens=19, cached_tokens=0, prefill_s=0.01, ttft_s=0.02)
        )


@pytest.mark.parametrize("name", [n for n in POLICY_NAMES if n != "cost"])
def test_baselines_always_disaggregate_when_prefill_workers_exist(name: str) -> None:
    policy = make_policy(name, PrefixIndex(), seed=1)
    workers = [worker("p", Role.PREFILL), worker("d", Role.DECODE)]
    d = policy.route(request([1, 2]), workers)
    assert (d.prefill.worker_id if d.prefill else None, d.decode.worker_id) == ("p", "d")


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest", PrefixIndex())


def test_round_robin_cycles() -> None:
    policy = make_policy("round_robin", PrefixIndex())
    workers = [worker("a"), worker("b"), worker("c")]
    picks = [policy.route(request([1]), workers).decode.worker_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_random_is_seeded_and_spreads() -> None:
    workers = [worker(str(i)) for i in range(4)]
    runs = []
    for _ in range(2):
        policy = make_policy("random", PrefixIndex(), seed=42)
        runs.append([policy.route(request([1]), workers).decode.worker_id for _ in range(40)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 4


def test_least_request_picks_fewest_inflight() -> None:
    policy = make_policy("least_request", PrefixIndex())
    workers = [worker("a", inflight=3), worker("b", inflight=1), worker("c", inflight=2)]
    assert policy.route(request([1]), workers).decode.worker_id == "b"


def test_session_is_sticky_and_stable_when_others_leave() -> None:
    policy = make_policy("session", PrefixIndex())
    workers = [worker(str(i)) for i in range(8)]
    homes = {s: policy.route(request([1], session=s), workers).decode.worker_id for s in map(str, range(50))}
    assert len(set(homes.values())) > 3
    for s, home in homes.items():
        assert policy.route(request([9], session=s), workers).decode.worker_id == home
    gone = workers[0].worker_id
    survivors = workers[1:]
    for s, home in homes.items():
        if home != gone:
            assert policy.route(request([1], session=s), survivors).decode.worker_id == home
    busy = [worker("a", inflight=5), worker("b", inflight=0)]
    assert policy.route(request([1]), busy).decode.worker_id == "b"  # no key: least loaded


def test_prefix_hash_sends_equal_prefixes_together() -> None:
    policy = make_policy("prefix_hash", PrefixIndex())
    workers = [worker(str(i)) for i in range(8)]
    first = {p: policy.route(request([p, 100]), workers).decode.worker_id for p in range(40)}
    assert len(set(first.values())) > 3
    for p, w in first.items():
        assert policy.route(request([p, 200, 300]), workers).decode.worker_id == w
    with pytest.raises(ValueError):
        make_policy("prefix_hash", PrefixIndex(), prefix_blocks=0)


def test_cache_aware_follows_the_longest_match_until_imbalanced() -> None:
    idx = PrefixIndex()
    idx.apply_event("b", "stored", "device", [1, 2, 3])
    idx.apply_event("c", "stored", "device", [1])
    policy = make_policy("cache_aware", idx)
    workers = [worker("a"), worker("b", inflight=2), worker("c")]
    d = policy.route(request([1, 2, 3, 4]), workers)
    assert d.decode.worker_id == "b"
    assert d.expected_cached_tokens == 3 * BS
    # low match ratio: the worker with the most room (fewest indexed blocks)
    assert policy.route(request([9, 8, 7]), workers).decode.worker_id == "a"
    # imbalance (b way above the others): least loaded wins over the match
    workers[1].inflight = 100
    assert policy.route(request([1, 2, 3, 4]), workers).decode.worker_id in {"a", "c"}


def test_cost_prefers_cached_worker_but_not_a_swamped_one() -> None:
    idx = PrefixIndex()
    idx.apply_event("b", "stored", "device", list(range(1, 101)))
    policy = make_policy("cost", idx)
    hashes = list(range(1, 121))
    workers = [worker("a"), worker("b")]
    d = policy.route(request(hashes), workers)
    assert d.decode.worker_id == "b" and d.prefill is None
    assert d.expected_cached_tokens == 100 * BS
    assert d.scores["b"] < d.scores["a"]
    workers[1].queued_prefill_tokens = 2_000_000  # minutes of queue: recompute elsewhere
    assert policy.route(request(hashes), workers).decode.worker_id == "a"


def test_cost_counts_tier_blocks_with_a_fetch_cost() -> None:
    idx = PrefixIndex()
    idx.apply_event("tier", "stored", "tier", list(range(1, 51)))
    policy = make_policy("cost", idx, tier_fetch_s_per_block=0.001)
    d = policy.route(request(list(range(1, 61))), [worker("a")])
    assert d.expected_cached_tokens == 50 * BS


def disagg_cluster() -> list[WorkerState]:
    return [worker("p1", Role.PREFILL), worker("p2", Role.PREFILL), worker("d1", Role.DECODE)]


def test_cost_disaggregates_only_above_the_threshold() -> None:
    policy = make_policy("cost", PrefixIndex(), disaggregation_threshold_tokens=1000)
    small = policy.route(request([1], tokens=500), disagg_cluster())
    assert small.prefill is None and small.decode.worker_id == "d1"
    assert small.reason == "below-threshold"
    big = policy.route(request(list(range(1, 200)), tokens=200 * BS), disagg_cluster())
    assert big.prefill is not None and big.prefill.role == Role.PREFILL
    assert big.decode.worker_id == "d1" and big.reason == "disaggregated"


def test_cost_stays_local_when_prefill_pool_is_saturated() -> None:
    policy = make_policy("cost", PrefixIndex(), disaggregation_threshold_tokens=0)
    workers = disagg_cluster()
    for w in workers[:2]:
        w.queued_prefill_tokens = 10_000_000
    d = policy.route(request(list(range(1, 200)), tokens=200 * BS), workers)
    assert d.prefill is None and d.reason == "prefill-saturated"


def test_cost_picks_decode_worker_by_free_blocks_and_load() -> None:
    policy = make_policy("cost", PrefixIndex(), disaggregation_threshold_tokens=0)
    workers = [
        worker("p", Role.PREFILL),
        worker("full", Role.DECODE, free_blocks=10, running_requests=0),
        worker("busy", Role.DECODE, free_blocks=900, running_requests=50),
        worker("good", Role.DECODE, free_blocks=800, running_requests=2),
    ]
    d = policy.route(request(list(range(1, 100))), workers)
    assert d.prefill is not None and d.decode.worker_id == "good"


def test_cost_splits_a_short_prompt_when_the_decode_worker_is_queued_and_prefill_idle() -> None:
    """Per request, not by size: 800 tokens (below any sensible size threshold) still go to the
    idle prefill worker when the decode worker has a second of prefill queued."""
    policy = make_policy("cost", PrefixIndex())
    workers = [worker("p", Role.PREFILL), worker("d", Role.DECODE, queued_prefill_tokens=10_000)]
    d = policy.route(request([1], tokens=800), workers)
    assert d.prefill is not None and d.prefill.worker_id == "p" and d.reason == "disaggregated"


def test_cost_keeps_a_request_local_when_the_prefill_pool_is_the_longer_wait() -> None:
    policy = make_policy("cost", PrefixIndex())
    workers = [worker("p", Role.PREFILL, queued_prefill_tokens=30_000), worker("d", Role.DECODE)]
    d = policy.route(request(list(range(1, 100)), tokens=100 * BS), workers)
    assert d.prefill is None and d.decode.worker_id == "d" and d.reason == "local-faster"


def test_cost_charges_local_prefill_compute_saturation_ratio_times() -> None:
    """Idle pools, equal estimates: the decode worker's compute counts ``saturation_ratio`` times,
    so the request splits; a ratio of 1 is the plain TTFT comparison (a tie stays local)."""
    big = request(list(range(1, 100)), tokens=100 * BS)
    for ratio, split in ((1.75, True), (1.0, False)):
        policy = make_policy("cost", PrefixIndex(), saturation_ratio=ratio)
        d = policy.route(big, [worker("p", Role.PREFILL), worker("d", Role.DECODE)])
        assert (d.prefill is not None) is split
    # decode worker: queue 0.5 s + compute 1600 tokens / 10k tok/s = 0.16 s, so TTFT 0.66 s and
    # cost 0.5 + 1.75 x 0.16 = 0.78 s; the prefill worker's TTFT 0.7 + 0.16 = 0.86 s is longer
    policy = make_policy("cost", PrefixIndex())
    workers = [
        worker("p", Role.PREFILL, queued_prefill_tokens=7_000),
        worker("d", Role.DECODE, queued_prefill_tokens=5_000),
    ]
    d = policy.route(big, workers)
    assert d.prefill is None and d.scores["p"] == pytest.approx(0.86)
    assert d.scores["d"] == pytest.approx(0.66)


def test_cost_compute_share_matches_the_ttft_estimate() -> None:
    """``_compute_s`` repeats the compute terms that ``_best`` inlines: on a worker with room and
    nothing to fetch the estimate is exactly queue + compute."""
    policy = make_policy("cost", PrefixIndex(), claim_routes=False)
    assert isinstance(policy, CostPolicy)
    for queued, step, rate in ((0, 0.0, 0.0), (20_000, 0.03, 25_000.0), (5, 0.5, 1_000.0)):
        w = worker(
            "d", Role.DECODE, queued_prefill_tokens=queued, decode_step_s=step, prefill_tokens_per_s=rate
        )
        req = request(list(range(1, 40)), tokens=40 * BS)
        d = policy.route(req, [w])
        expected = queued / (rate or policy.default_rate) + policy._compute_s(w, req.prompt_tokens)
        assert d.scores["d"] == pytest.approx(expected)


def test_cost_p_d_knobs_do_not_touch_aggregated_clusters() -> None:
    """Without prefill workers nothing of the split rule runs: decisions are the same whatever
    the P/D settings and whatever feedback arrived."""
    idx = PrefixIndex()
    idx.apply_event("b", "stored", "device", list(range(1, 51)))
    workers = [
        worker("a", queued_prefill_tokens=3_000),
        worker("b", queued_prefill_tokens=9_000),
        worker("c"),
    ]
    reqs = [request(list(range(1, 1 + n)), tokens=n * BS) for n in (1, 20, 60, 200)]
    plain = make_policy("cost", idx, claim_routes=False)
    tuned = make_policy(
        "cost", idx, claim_routes=False, saturation_ratio=5.0, disaggregation_threshold_tokens=0
    )
    feed(tuned, 50, rate=5_000, handoff=1.0, step=0.1)
    for r in reqs:
        a, b = plain.route(r, workers), tuned.route(r, workers)
        assert a.reason == b.reason == "aggregated-cluster" and a.prefill is None and b.prefill is None
        assert a.decode.worker_id == b.decode.worker_id and a.scores == b.scores


@pytest.mark.parametrize(
    ("trace", "requests", "prefill", "decode", "load"),
    [
        ("mooncake_synthetic_tail400.jsonl", 300, 2, 6, 3.0),  # short prompts: most stay local
        ("kv-cache-tester_first7.tar.xz", 150, 4, 4, 3.815),  # long agentic sessions: most split
    ],
)
def test_cost_p_d_never_loses_to_never_or_always_splitting(
    trace: str, requests: int, prefill: int, decode: int, load: float
) -> None:
    """Simulated (deterministic), with the live router's information model: p90 TTFT within 5%
    of the better of never splitting and always splitting, and far ahead of never splitting.
    The size threshold this rule replaced split too little on the agentic trace (1.6x worse)."""
    profile = load_profile("h100-llama8b").scaled(16)
    reqs = load_trace(TRACES / trace, block_size=4, token_scale=16, max_requests=requests)
    p90 = {}
    for name, settings in (
        ("cost", {}),
        ("never", {"disaggregation_threshold_tokens": 1 << 30}),
        ("always", {"disaggregation_threshold_tokens": 0}),
    ):
        config = SimConfig(
            policy_settings=settings,
            prefill_workers=prefill,
            decode_workers=decode,
            load_scale=load,
            block_size=4,
            poll_interval_s=1.0,
        )
        result = Simulator(reqs, config, profile).run()
        assert result["completed"] == len(reqs)
        p90[name] = result["ttft_p90_s"]
    assert p90["cost"] <= 1.05 * min(p90["never"], p90["always"])
    assert p90["cost"] < 0.7 * p90["never"]


def outcome(
    aggregated: bool,
    uncached: int,
    prefill_s: float,
    wait_s: float,
    handoff_s: float | None,
    decode_step_s: float,
) -> RequestOutcome:
    decode = worker("d", Role.DECODE)
    decision = RoutingDecision(decode=decode, prefill=None if aggregated else worker("p", Role.PREFILL))
    return RequestOutcome(
        decision=decision,
        prompt_tokens=uncached,
        cached_tokens=0,
        prefill_s=prefill_s,
        ttft_s=prefill_s + wait_s,
        decode_tokens=100,
        decode_s=100 * decode_step_s,
        handoff_s=None if aggregated else handoff_s,
    )


def feed(policy: CostPolicy, n: int, **kw: float) -> None:
    for _ in range(n):
        policy.observe(
            outcome(
                aggregated=True,
                uncached=int(kw["rate"]),
                prefill_s=1.0,
                wait_s=0.0,
                handoff_s=None,
                decode_step_s=kw["step"],
            )
        )
        policy.observe(
            outcome(
                aggregated=False,
                uncached=int(kw["rate"]),
                prefill_s=1.0,
                wait_s=0.0,
                handoff_s=kw["handoff"],
                decode_step_s=kw["step"],
            )
        )


def test_threshold_follows_the_documented_rule() -> None:
    policy = make_policy("cost", PrefixIndex(), stall_budget_steps=4)
    assert isinstance(policy, CostPolicy)
    feed(policy, 400, rate=20_000, handoff=0.05, step=0.02)
    # T = r * (o + m * s) = 20000 * (0.05 + 4 * 0.02) = 2600
    assert policy.threshold_tokens == pytest.approx(2600, rel=0.02)


@pytest.mark.parametrize(
    ("change", "direction"),
    [
        ({"rate": 40_000}, +1),  # faster local prefill: more stays local
        ({"rate": 5_000}, -1),
        ({"handoff": 0.5}, +1),  # costlier handoff: more stays local
        ({"handoff": 0.0}, -1),
        ({"step": 0.1}, +1),  # slower decode steps tolerate longer stalls
        ({"step": 0.005}, -1),
    ],
)
def test_threshold_moves_in_the_documented_direction(change: dict[str, float], direction: int) -> None:
    base = {"rate": 20_000, "handoff": 0.05, "step": 0.02}
    policy = make_policy("cost", PrefixIndex())
    assert isinstance(policy, CostPolicy)
    feed(policy, 300, **base)
    before = policy.threshold_tokens
    feed(policy, 300, **{**base, **change})
    after = policy.threshold_tokens
    assert (after - before) * direction > 0.05 * before


def test_disaggregation_wait_raises_the_overhead() -> None:
    policy = make_policy("cost", PrefixIndex())
    assert isinstance(policy, CostPolicy)
    before = policy.overhead_s
    for _ in range(200):
        policy.observe(outcome(False, 1000, 0.1, wait_s=0.8, handoff_s=0.01, decode_step_s=0.02))
        policy.observe(outcome(True, 1000, 0.1, wait_s=0.1, handoff_s=None, decode_step_s=0.02))
    assert policy.overhead_s > before + 0.5


def test_threshold_override_is_respected_and_alias_works() -> None:
    for kw in ({"disaggregation_threshold_tokens": 777}, {"threshold_tokens": 777}):
        policy = make_policy("cost", PrefixIndex(), **kw)
        assert isinstance(policy, CostPolicy)
        feed(policy, 200, rate=50_000, handoff=1.0, step=0.1)
        assert policy.threshold_tokens == 777
    with pytest.raises(ValueError):
        make_policy("cost", PrefixIndex(), disaggregation_threshold_tokens=-1)


def test_failed_outcomes_do_not_train_the_threshold() -> None:
    policy = make_policy("cost", PrefixIndex())
    assert isinstance(policy, CostPolicy)
    before = policy.threshold_tokens
    bad = outcome(True, 1000, 100.0, 0.0, None, 5.0)
    bad.ok = False
    for _ in range(100):
        policy.observe(bad)
    assert policy.threshold_tokens == before


def test_cost_spreads_cold_prefixes_over_idle_workers_consistently() -> None:
    """Equal estimates (idle cluster, nothing cached): the prompt's rendezvous home breaks the
    tie, so new prefixes use every worker's cache and a prefix returns to the same worker."""
    policy = make_policy("cost", PrefixIndex(), claim_routes=False)
    workers = [worker(str(i)) for i in range(8)]
    homes = {p: policy.route(request([p, p + 1000]), workers).decode.worker_id for p in range(1, 81)}
    assert len(set(homes.values())) >= 6
    for p, home in homes.items():
        assert policy.route(request([p, 5000]), workers).decode.worker_id == home

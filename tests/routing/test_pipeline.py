"""The scorer pipeline and the peer profiles, the router-side load account, claims with a TTL,
and the trace readers the live replay shares with the simulator."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from tusk.router.load_account import LoadReportView, WorkerLoad, open_ticket
from tusk.router.policies import POLICY_NAMES, RoutingDecision, RoutingRequest, WorkerState, make_policy
from tusk.router.prefix_index import PrefixIndex
from tusk.router.sim.trace import TraceError, load_trace

from tusk.config import RoutingConfig

BS = 16
DATA = Path(__file__).resolve().parents[1] / "data" / "traces"


def worker(wid: str, **load: object) -> WorkerState:
    state = WorkerState(worker_id=wid, address=f"{wid}:1", free_blocks=1000, total_blocks=1000)
    for k, v in load.items():
        setattr(state, k, v)
    return state


def request(hashes: list[int], session: str | None = None) -> RoutingRequest:
    return RoutingRequest("r", hashes, len(hashes) * BS + 3, BS, session_key=session, max_tokens=8)


def test_peer_profiles_are_policy_names_and_bad_config_is_refused() -> None:
    for name in ("sglang_cache_aware", "llmd_sticky", "llmd_weighted", "dynamo_cost"):
        assert name in POLICY_NAMES
    with pytest.raises(ValueError, match="valid settings: .*recompute_weight"):
        make_policy("cost", PrefixIndex(), recompute_wieght=2)
    with pytest.raises(ValueError, match="valid scorers: prefix, queue"):
        make_policy("weighted", PrefixIndex(), weights={"prefix": 1, "cache": 1})
    with pytest.raises(ValueError, match="choose one of"):
        RoutingConfig(policy="fastest")
    with pytest.raises(ValueError, match="unknown routing setting"):
        RoutingConfig(policy="cost", settings={"claim_ttl": 2})
    assert (
        RoutingConfig(policy="llmd_weighted", settings={"weights": {"prefix": 1}}).allow_policy_header
        is False
    )


def test_llmd_weighted_follows_the_prefix_until_queue_and_kv_outweigh_it() -> None:
    index = PrefixIndex()
    index.apply_event("a", "stored", "device", [1, 2, 3, 4])
    policy = make_policy("llmd_weighted", index)
    a, b = worker("a"), worker("b")
    assert policy.route(request([1, 2, 3, 4]), [a, b]).decode is a
    # prefix 3 x 1.0 vs queue 2 x 1 + KV 2 x (1.0 - 0.0): a full, queued worker loses
    a.queued_requests, a.free_blocks = 10, 0
    assert policy.route(request([1, 2, 3, 4]), [a, b]).decode is b


def test_llmd_sticky_stays_until_saturated() -> None:
    index = PrefixIndex()
    index.apply_event("a", "stored", "device", [1, 2])
    policy = make_policy("llmd_sticky", index)
    a, b = worker("a", queued_requests=4), worker("b")
    assert policy.route(request([1, 2]), [a, b]).decode is a  # busier, but not saturated
    a.queued_requests = 5
    assert policy.route(request([1, 2]), [a, b]).decode is b


def test_dynamo_cost_weighs_cache_credit_against_active_blocks() -> None:
    index = PrefixIndex()
    index.apply_event("a", "stored", "device", list(range(1, 41)))
    policy = make_policy("dynamo_cost", index)
    a, b = worker("a"), worker("b")
    assert policy.route(request(list(range(1, 41))), [a, b]).decode is a  # 40 blocks of credit
    a.free_blocks = 900  # 100 active blocks outweigh 40 blocks of prefill
    assert policy.route(request(list(range(1, 41))), [a, b]).decode is b


def test_cache_aware_inserts_on_route_and_sglang_keeps_its_own_tree() -> None:
    for name in ("cache_aware", "sglang_cache_aware"):
        index = PrefixIndex()
        policy = make_policy(name, index)
        ws = [worker("a"), worker("b"), worker("c")]
        first = policy.route(request([7, 8, 9]), ws).decode
        # no KV event arrived: the route itself makes the next turn follow the prefix
        assert all(policy.route(request([7, 8, 9, 10]), ws).decode is first for _ in range(3))
    assert index.match([7, 8, 9]) == {}  # sglang_cache_aware never wrote the shared index


def test_prefix_hash_bounded_load_moves_off_an_overloaded_home() -> None:
    policy = make_policy("prefix_hash", PrefixIndex())
    ws = [worker("a"), worker("b"), worker("c"), worker("d")]
    home = policy.route(request([42]), ws).decode
    assert policy.route(request([42]), ws).decode is home
    home.inflight = 10
    assert policy.route(request([42]), ws).decode is not home


def test_claims_expire_unless_a_kv_event_confirms_them() -> None:
    now = [0.0]
    index = PrefixIndex()
    index.clock = lambda: now[0]
    index.claim("a", [1, 2, 3], ttl_s=2.0)
    index.claim("b", [5, 6], ttl_s=2.0)
    index.apply_event("b", "stored", "device", [5, 6])
    assert index.match([1, 2, 3]) == {"a": 3}
    now[0] = 2.5
    assert index.match([1, 2, 3]) == {}
    assert index.match([5, 6]) == {"b": 2}


def test_load_account_predicts_between_reports_and_returns_to_zero() -> None:
    a, b = worker("a"), worker("b")
    loads = {"a": WorkerLoad(a), "b": WorkerLoad(b)}
    loads["a"].apply_report(LoadReportView(0, 0, 0, 1000, 1000, 1000.0, 0.01))
    decision = RoutingDecision(decode=a, expected_cached_tokens=100)
    ticket = open_ticket(loads, decision, prompt_tokens=1100, max_tokens=60, block_size=16)
    assert a.queued_prefill_tokens == 1000 and a.free_blocks == 1000 - 73
    # a report taken after the request started shows the same work: nothing counted twice
    loads["a"].apply_report(LoadReportView(1, 0, 1000, 927, 1000, 1000.0, 0.01))
    assert a.queued_prefill_tokens == 1000 and a.free_blocks == 927
    ticket.first_token()
    assert a.queued_prefill_tokens == 0 and a.running_requests == 1
    ticket.done()
    ticket.done()
    assert (a.queued_prefill_tokens, a.running_requests, a.free_blocks) == (0, 0, 1000)
    # split: the prefill worker frees its blocks at the first token, the decode worker holds them
    split = open_ticket(loads, RoutingDecision(decode=b, prefill=a), 160, 16, 16)
    split.first_token()
    split.decode_started()
    assert a.free_blocks == 1000 and b.running_requests == 1
    split.done()
    assert b.running_requests == 0 and b.free_blocks == 1000


def _kvtester_archive(path: Path, sessions: list[dict]) -> None:
    with tarfile.open(path, "w:xz") as tf:
        for i, session in enumerate(sessions):
            data = json.dumps(session).encode()
            info = tarfile.TarInfo(f"traces/trace_{i:04d}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_kvtester_sessions_namespaced_with_subagents_and_malformed_requests_named(tmp_path: Path) -> None:
    session = {
        "id": "s",
        "block_size": 64,
        "requests": [
            {"t": 0.0, "in": 200, "out": 5, "hash_ids": [1, 2, 3]},
            {
                "type": "subagent",
                "t": 10.0,
                "requests": [{"t": 1.0, "in": 130, "out": 2, "hash_ids": [1, 2]}],
            },
            {"t": 30.0, "in": 260, "out": 7, "hash_ids": [1, 2, 3, 4]},
        ],
    }
    archive = tmp_path / "traces.tar.xz"
    _kvtester_archive(archive, [session, dict(session, id="t")])
    reqs = load_trace(archive, block_size=16)
    assert len(reqs) == 6 and [r.arrival_s for r in reqs[:3]] == sorted(r.arrival_s for r in reqs[:3])
    first = [r for r in reqs if r.session_key == "s"]
    a, sub, c = sorted(first[:3], key=lambda r: r.arrival_s)
    assert sub.arrival_s == 11.0 and len(a.block_hashes) == 12 and c.block_hashes[:12] == a.block_hashes
    # the same ids in another session are different blocks (scoped per session)
    other = [r for r in reqs if r.session_key == "t"]
    assert len(other) == 3 and not {h for r in first for h in r.block_hashes} & {
        h for r in other for h in r.block_hashes
    }
    # token scaling keeps the sharing structure
    scaled = load_trace(archive, block_size=4, token_scale=4)
    assert len(scaled[0].block_hashes) == len(reqs[0].block_hashes)
    bad = dict(session, requests=[{"t": 0.0, "in": "many", "out": 1}])
    _kvtester_archive(tmp_path / "bad.tar.xz", [bad])
    with pytest.raises(TraceError, match=r"trace_0000.json: request 0: malformed"):
        load_trace(tmp_path / "bad.tar.xz")


def test_mooncake_bad_line_names_the_line(tmp_path: Path) -> None:
    lines = (DATA / "mooncake_synthetic_tail400.jsonl").read_text().splitlines()[:3]
    bad = tmp_path / "t.jsonl"
    bad.write_text("\n".join([*lines, '{"timestamp": 1, "input_length": "x"}']))
    with pytest.raises(TraceError, match=r"t.jsonl:4"):
        load_trace(bad)


def test_cost_counts_the_wait_for_kv_room() -> None:
    """A worker holding the prefix but without KV room for the request cannot start it until
    running decodes release blocks; cost prices that wait instead of queueing there blindly."""
    index = PrefixIndex()
    hashes = list(range(1, 101))
    index.apply_event("a", "stored", "device", hashes)
    policy = make_policy("cost", index, claim_routes=False)
    req = RoutingRequest("r", hashes, 100 * BS + 3, BS, max_tokens=400)
    a = worker("a", prefill_tokens_per_s=25_000.0, decode_step_s=0.03)
    b = worker("b", prefill_tokens_per_s=25_000.0, decode_step_s=0.03)
    assert policy.route(req, [a, b]).decode is a  # room everywhere: the cached worker
    a.free_blocks = 10  # needs 126 blocks: ~0.92 x 0.03 s x 400 = 11 s before it could start
    assert policy.route(req, [a, b]).decode is b

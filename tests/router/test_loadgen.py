"""``tusk bench`` against a live router: numbers come back and mean what they say."""

from __future__ import annotations

import json
from pathlib import Path

from tusk.router import loadgen
from tusk.router.workload import load_trace

TRACES = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces"


def test_bench_streaming_json(two_worker_router, capsys) -> None:
    _, workers, url = two_worker_router
    rc = loadgen.main(
        ["--url", url, "--requests", "12", "--concurrency", "4", "--output-tokens", "5", "--json", "--quiet"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["completed"] == 12 and summary["errors"] == 0
    assert summary["output_tokens"] == 12 * 5  # from the server's usage
    assert 0 < summary["ttft_p50_s"] <= summary["e2e_p50_s"]
    assert summary["itl_p50_s"] is not None
    assert sum(len(w.s.generate_calls) for w in workers) == 12


def test_bench_poisson_non_streaming_counts_errors(harness, capsys) -> None:
    _, endpoint = harness.worker(reject_longer_than=50)
    _, url = harness.router([endpoint])
    rc = loadgen.main(
        [
            "--url",
            url,
            "-n",
            "6",
            "--rate",
            "200",
            "--input-tokens",
            "100",
            "--no-stream",
            "--json",
            "--quiet",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and summary["errors"] == 6 and summary["error_kinds"] == {"HTTP 400": 6}


def test_mooncake_prompts_share_prefixes_exactly_where_hash_ids_match(tmp_path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1024, "output_length": 3, "hash_ids": [1, 2]},
        {"timestamp": 5, "input_length": 1500, "output_length": 3, "hash_ids": [1, 2, 3]},
        {"timestamp": 9, "input_length": 1024, "output_length": 3, "hash_ids": [1, 4]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    a, b, c = load_trace(trace, None, None, token_scale=64)  # 512-token blocks -> 8 words
    wa, wb, wc = a.prompt.split(), b.prompt.split(), c.prompt.split()
    assert len(wa) == 16 and len(wb) == -(-1500 // 64) and wb[:16] == wa
    assert wc[:8] == wa[:8] and wc[8:] != wa[8:]
    assert (a.at_s, b.at_s, c.at_s) == (0, 0.005, 0.009)
    if (TRACES / "synthetic_trace.jsonl").exists():
        assert len(load_trace(TRACES / "synthetic_trace.jsonl", None, 20, token_scale=64)) == 20


def test_malformed_trace_line_is_an_error_naming_the_line(tmp_path, capsys) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n{"timestamp": oops}\n'
    )
    assert loadgen.main(["--trace", str(trace), "--replay", "--url", "http://127.0.0.1:9"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err

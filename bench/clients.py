"""Standard benchmark clients drive ``tusk serve`` unmodified: aiperf and guidellm from PyPI.

Starts ``tusk serve`` with SmolLM2-135M-Instruct (``bench/smollm2.py``), then runs each client,
installed in its own venv (``/work/peers/aiperf``: ``pip install aiperf==0.13.0``;
``/work/peers/guidellm``: ``pip install torch==2.13.0 guidellm==0.8.1``), against its chat
endpoint with streaming, the vLLM extensions they send (``ignore_eos``, ``stop: null``,
``max_completion_tokens``, ``stream_options.include_usage``) and their own tokenizer counts.
A client counts as passing when every request succeeded and each produced the requested output
length. Both run offline: aiperf reads the tokenizer from a hand-made Hugging Face cache entry
(it refuses local paths), guidellm from the model folder.

    python bench/clients.py [--requests 16] [--concurrency 4]

Ends with one JSON line: per client, requests ok/errored, output tokens/s, mean TTFT and ITL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import MODEL_NAME, PEERS, free_port, tusk_server  # noqa: E402
from smollm2 import hf_folder  # noqa: E402

ISL, OSL = 100, 32
FAKE_REPO = "tusk-bench/smollm2"
FAKE_COMMIT = "0" * 40


def hf_cache_entry(home: Path, folder: Path) -> None:
    """``HF_HOME`` layout for ``FAKE_REPO``, so hub lookups succeed with HF_HUB_OFFLINE=1."""
    repo = home / "hub" / f"models--{FAKE_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        if (folder / name).is_file() and not (snapshot / name).exists():
            (snapshot / name).symlink_to(folder / name)


def run_aiperf(url: str, folder: Path, work: Path, requests: int, concurrency: int) -> dict:
    exe = PEERS / "aiperf" / "bin" / "aiperf"
    if not exe.exists():
        return {"ran": False, "why": f"not installed in {exe.parent.parent} (pip install aiperf==0.13.0)"}
    home = work / "hf-home"
    hf_cache_entry(home, folder)
    out = work / "aiperf"
    cmd = [str(exe), "profile", "--model", MODEL_NAME, "--tokenizer", FAKE_REPO, "--url", url]
    cmd += ["--endpoint-type", "chat", "--streaming", "--isl", str(ISL), "--osl", str(OSL)]
    cmd += ["--request-count", str(requests), "--concurrency", str(concurrency), "--ui", "none"]
    cmd += ["--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out)]
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=work)
    report = out / "profile_export_aiperf.json"
    if proc.returncode != 0 or not report.is_file():
        return {"ran": False, "why": f"exit {proc.returncode}: {proc.stderr[-400:] or proc.stdout[-400:]}"}
    data = json.loads(report.read_text())
    osl = data["usage_completion_tokens"]
    ok = int(data["request_count"]["avg"])
    return {
        "ran": True,
        "requests_ok": ok,
        "requests_errored": requests - ok,
        "server_output_tokens_per_request": [osl.get("min"), osl.get("max")],
        "output_tok_s": round(data["output_token_throughput"]["avg"], 1),
        "ttft_ms": round(data["time_to_first_token"]["avg"], 1),
        "itl_ms": round(data["inter_token_latency"]["avg"], 1),
        "passed": ok == requests and osl.get("min") == osl.get("max") == OSL,
    }


def run_guidellm(url: str, folder: Path, work: Path, requests: int, concurrency: int) -> dict:
    exe = PEERS / "guidellm" / "bin" / "guidellm"
    if not exe.exists():
        return {"ran": False, "why": f"not installed in {exe.parent.parent} (pip install guidellm==0.8.1)"}
    report = work / "guidellm.json"
    cmd = [str(exe), "run", "--backend", f"kind=openai_http,target={url},model={MODEL_NAME},"]
    cmd[-1] += "request_format=/v1/chat/completions"
    cmd += ["--profile", f"kind=concurrent,streams={concurrency}"]
    cmd += ["--constraint", f"kind=max_requests,count={requests}"]
    cmd += ["--tokenizer", f"kind=huggingface_auto,model={folder}"]
    cmd += ["--data", f"kind=synthetic_text,prompt_tokens={ISL},output_tokens={OSL}"]
    cmd += ["--disable-console-interactive", "--output", f"kind=json,path={report}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=work)
    if proc.returncode != 0 or not report.is_file():
        return {"ran": False, "why": f"exit {proc.returncode}: {proc.stderr[-400:] or proc.stdout[-400:]}"}
    bench = json.loads(report.read_text())["benchmarks"][0]
    m = bench["metrics"]
    totals = m["request_totals"]
    osl = m["output_token_count"]["successful"]
    return {
        "ran": True,
        "requests_ok": totals["successful"],
        "requests_errored": totals["errored"] + totals["incomplete"],
        "server_output_tokens_per_request": [osl["min"], osl["max"]],
        "output_tok_s": round(osl["total_sum"] / bench["duration"], 1),
        "ttft_ms": round(m["time_to_first_token_ms"]["successful"]["mean"], 1),
        "itl_ms": round(m["inter_token_latency_ms"]["successful"]["mean"], 1),
        "passed": totals["successful"] == requests and osl["min"] == osl["max"] == OSL,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    folder = hf_folder()
    work = Path(tempfile.mkdtemp(prefix="tusk-bench-clients-"))
    port = free_port()
    results = {}
    with tusk_server(folder, args.dtype, work, port):
        url = f"http://127.0.0.1:{port}"
        for name, run in (("aiperf", run_aiperf), ("guidellm", run_guidellm)):
            results[name] = run(url, folder, work, args.requests, args.concurrency)
            print(f"{name}: {results[name]}", flush=True)
    summary = {
        "bench": "clients",
        "model": "SmolLM2-135M-Instruct",
        "workload": {"isl": ISL, "osl": OSL, "requests": args.requests, "concurrency": args.concurrency},
        "clients": results,
        "all_passed": all(r.get("passed") for r in results.values()),
    }
    print(json.dumps(summary))
    return 0 if summary["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

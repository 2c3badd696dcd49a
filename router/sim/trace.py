"""Request traces for the simulator and the live replay: Mooncake jsonl (prefix hashes over
512-token blocks), kv-cache-tester agentic sessions (JSON per session, 64-token blocks, read
from the .tar.xz as published, a folder, or one .json) and Azure csv (no prefix information).

Every reader returns ``TraceRequest``s carrying the trace's own block ids (``hash_ids``) and
block size (``trace_block_tokens``), so the simulator derives model-block hashes from them and
the live replay derives text from them (``tusk.router.workload``): both see the same sharing.
A malformed line is a ``TraceError`` naming the file and the line (or session and request).

Mooncake hashes 512-token blocks; the router hashes model blocks (``block_size`` tokens, e.g.
64). Each trace block is cut into ``512 // block_size`` model blocks whose hashes are derived
from the trace id and the position inside it, so two requests share a model block exactly when
they share the trace block (which, by the trace's construction, means the same prefix up to
there). As in vLLM, only full model blocks are hashed; the tail of a prompt never is.

The session key (for the ``session`` policy) is the first trace block id: a multi-turn
conversation keeps its first block, so this is the closest the trace gets to a user id.
"""

from __future__ import annotations

import csv
import json
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
KVTESTER_BLOCK_TOKENS = 64
FORMATS = ("mooncake", "azure", "kvtester")


class TraceError(ValueError):
    """The trace file is missing, malformed or has no requests."""


@dataclass
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    session_key: str | None = None
    hash_ids: list[int] = field(default_factory=list)  # the trace's block ids (namespaced)
    trace_block_tokens: int = MOONCAKE_BLOCK_TOKENS


def model_block_hashes_for(
    hash_ids: list[int], input_tokens: int, block_size: int, trace_block: int
) -> list[int]:
    """Model-block hashes for trace blocks of ``trace_block`` tokens (full model blocks only):
    trace block ``hid`` becomes ``trace_block // block_size`` blocks with derived hashes."""
    if trace_block % block_size:
        raise TraceError(f"block size {block_size} must divide the trace's {trace_block}-token blocks")
    per = trace_block // block_size
    n_full = input_tokens // block_size
    out: list[int] = []
    for hid in hash_ids:
        for j in range(per):
            if len(out) == n_full:
                return out
            out.append((hid + 1) * 1024 + j)
    return out


def model_block_hashes(hash_ids: list[int], input_tokens: int, block_size: int) -> list[int]:
    """Model-block hashes for a Mooncake request (full model blocks only)."""
    return model_block_hashes_for(hash_ids, input_tokens, block_size, MOONCAKE_BLOCK_TOKENS)


def load_mooncake(path: Path, block_size: int) -> list[TraceRequest]:
    if MOONCAKE_BLOCK_TOKENS % block_size:
        raise TraceError(
            f"block size {block_size} must divide the trace's {MOONCAKE_BLOCK_TOKENS}-token blocks"
        )
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts = float(row["timestamp"]) / 1000.0
                n_in = int(row["input_length"])
                n_out = int(row["output_length"])
                ids = [int(h) for h in row.get("hash_ids", [])]
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}:{lineno}: not a Mooncake trace line ({exc})") from exc
            if n_in < 1 or n_out < 1 or ts < 0:
                raise TraceError(f"{path}:{lineno}: lengths must be >= 1 and timestamp >= 0")
            requests.append(
                TraceRequest(
                    arrival_s=ts,
                    input_tokens=n_in,
                    output_tokens=n_out,
                    block_hashes=model_block_hashes(ids, n_in, block_size),
                    session_key=str(ids[0]) if ids else None,
                    hash_ids=ids,
                )
            )
    return requests


def load_azure(path: Path) -> list[TraceRequest]:
    """Azure LLM inference csv: arrivals and lengths only, so no request shares a prefix."""
    requests: list[TraceRequest] = []
    t0: datetime | None = None
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for lineno, row in enumerate(reader, 2):
            try:
                stamp = row["TIMESTAMP"].strip()
                # Python's %f takes at most 6 digits; the trace has 7.
                head, _, frac = stamp.partition(".")
                t = datetime.strptime(f"{head}.{(frac + '000000')[:6]}", "%Y-%m-%d %H:%M:%S.%f")
                n_in = int(row["ContextTokens"])
                n_out = int(row["GeneratedTokens"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TraceError(f"{path}:{lineno}: not an Azure trace row ({exc})") from exc
            t0 = t0 or t
            requests.append(
                TraceRequest(
                    arrival_s=(t - t0).total_seconds(),
                    input_tokens=max(1, n_in),
                    output_tokens=max(1, n_out),
                )
            )
    return requests


def _kvtester_sessions(path: Path) -> Iterator[tuple[str, dict]]:
    """(name, session) pairs from the published .tar.xz (streamed), a folder or one file."""
    if path.is_dir():
        for f in sorted(path.glob("*.json")):
            yield f.name, _json_file(f)
        return
    if path.name.endswith((".tar.xz", ".tar", ".tar.gz", ".tgz")):
        try:
            with tarfile.open(path) as tf:
                for member in tf:
                    if member.isfile() and member.name.endswith(".json"):
                        f = tf.extractfile(member)
                        assert f is not None
                        try:
                            yield member.name, json.load(f)
                        except ValueError as exc:
                            raise TraceError(f"{path}:{member.name}: not JSON ({exc})") from exc
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise TraceError(f"{path}: not a readable tar archive ({exc})") from exc
        return
    yield path.name, _json_file(path)


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TraceError(f"{path}: not JSON ({exc})") from exc


def load_kvtester(
    path: Path,
    block_size: int,
    *,
    session_gap_s: float = 30.0,
    max_sessions: int | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """kv-cache-tester agentic sessions (callanjfox/kv-cache-tester, ``traces/``).

    Sessions have no absolute start times, so (as its README suggests) they start as a Poisson
    process with mean gap ``session_gap_s`` (seeded); each request arrives at its session's
    start plus its own ``t`` (a sub-agent's requests at the sub-agent's ``t`` plus theirs). Block
    ids are scoped per session, so they are namespaced as ``session << 32 | id``. The session
    key (for the ``session`` policy) is the session's id."""
    rng = random.Random(seed)
    requests: list[TraceRequest] = []
    start = 0.0
    for n, (name, session) in enumerate(_kvtester_sessions(path)):
        if max_sessions is not None and n >= max_sessions:
            break
        if not isinstance(session, dict) or not isinstance(session.get("requests"), list):
            raise TraceError(f"{path}:{name}: not a kv-cache-tester session (no requests list)")
        trace_block = int(session.get("block_size", KVTESTER_BLOCK_TOKENS))
        key = str(session.get("id", name))
        ns = (n + 1) << 32

        def add(
            entries: list,
            t0: float,
            where: str,
            ns: int = ns,
            name: str = name,
            tb: int = trace_block,
            key: str = key,
        ) -> None:
            for i, row in enumerate(entries):
                try:
                    if row.get("type") == "subagent":
                        add(row.get("requests") or [], t0 + float(row["t"]), f"{where}/subagent {i}")
                        continue
                    t = t0 + float(row["t"])
                    n_in, n_out = int(row["in"]), int(row["out"])
                    ids = [ns | int(h) for h in row.get("hash_ids", [])]
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise TraceError(f"{path}:{name}: request {where}{i}: malformed ({exc!r})") from exc
                if n_in < 1 or t < 0:
                    raise TraceError(f"{path}:{name}: request {where}{i}: input must be >= 1 and t >= 0")
                requests.append(
                    TraceRequest(
                        arrival_s=t,
                        input_tokens=n_in,
                        output_tokens=max(1, n_out),
                        block_hashes=model_block_hashes_for(ids, n_in, block_size, tb),
                        session_key=key,
                        hash_ids=ids,
                        trace_block_tokens=tb,
                    )
                )

        add(session["requests"], start, "")
        start += rng.expovariate(1.0 / session_gap_s) if session_gap_s > 0 else 0.0
    return requests


def guess_format(path: Path) -> str:
    name = path.name
    if name.endswith(".csv"):
        return "azure"
    if path.is_dir() or name.endswith((".tar.xz", ".tar", ".tar.gz", ".tgz", ".json")):
        return "kvtester"
    return "mooncake"


def scale_tokens(requests: list[TraceRequest], token_scale: int, block_size: int) -> list[TraceRequest]:
    """Shrink every prompt by ``token_scale`` (see ``WorkerProfile.scaled``): lengths and trace
    blocks divide by it, ``block_size`` is the (already scaled) model block size. Sharing is
    unchanged: the same trace blocks give the same model blocks."""
    if token_scale == 1:
        return requests
    out = []
    for r in requests:
        tb = r.trace_block_tokens // token_scale
        if tb < 1 or r.trace_block_tokens % token_scale:
            raise TraceError(
                f"token scale {token_scale} must divide the trace's {r.trace_block_tokens}-token blocks"
            )
        n_in = max(1, math.ceil(r.input_tokens / token_scale))
        out.append(
            replace(
                r,
                input_tokens=n_in,
                trace_block_tokens=tb,
                block_hashes=model_block_hashes_for(r.hash_ids, n_in, block_size, tb) if r.hash_ids else [],
            )
        )
    return out


def load_trace(
    path: str | Path,
    fmt: str | None = None,
    block_size: int = 64,
    *,
    token_scale: int = 1,
    max_requests: int | None = None,
    session_gap_s: float = 30.0,
    seed: int = 0,
) -> list[TraceRequest]:
    """Load a trace; ``fmt`` is guessed from the name when None (.csv: azure; .tar.xz, .json or
    a folder: kvtester; else mooncake). Sorted by arrival, starting at 0. With ``token_scale``
    > 1 prompts shrink by that factor and ``block_size`` is the scaled model block size."""
    p = Path(path)
    if not p.exists():
        raise TraceError(f"trace file not found: {p}")
    fmt = fmt or guess_format(p)
    trace_bs = block_size * token_scale  # the model block size in unscaled tokens
    if fmt == "mooncake":
        requests = load_mooncake(p, trace_bs)
    elif fmt == "azure":
        requests = load_azure(p)
    elif fmt == "kvtester":
        # enough sessions for max_requests (sessions hold ~70 requests; reading all takes ~35 s)
        sessions = None if max_requests is None else max(1, max_requests // 20)
        requests = load_kvtester(p, trace_bs, session_gap_s=session_gap_s, max_sessions=sessions, seed=seed)
    else:
        raise TraceError(f"unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not requests:
        raise TraceError(f"{p}: no requests")
    t0 = min(r.arrival_s for r in requests)
    for r in requests:
        r.arrival_s -= t0
    requests.sort(key=lambda r: r.arrival_s)
    if max_requests is not None:
        requests = requests[:max_requests]
    return scale_tokens(requests, token_scale, block_size)

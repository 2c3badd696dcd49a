"""Request traces for the simulator: Mooncake jsonl (with prefix hashes) and Azure csv (without).

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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(ValueError):
    """The trace file is missing, malformed or has no requests."""


@dataclass
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    session_key: str | None = None


def model_block_hashes(hash_ids: list[int], input_tokens: int, block_size: int) -> list[int]:
    """Model-block hashes for a Mooncake request (full model blocks only)."""
    per = MOONCAKE_BLOCK_TOKENS // block_size
    n_full = input_tokens // block_size
    out: list[int] = []
    for hid in hash_ids:
        for j in range(per):
            if len(out) == n_full:
                return out
            out.append((hid + 1) * 1024 + j)
    return out


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


def load_trace(path: str | Path, fmt: str | None = None, block_size: int = 64) -> list[TraceRequest]:
    """Load a trace; ``fmt`` is guessed from the suffix when None. Sorted by arrival."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file not found: {p}")
    fmt = fmt or ("azure" if p.suffix == ".csv" else "mooncake")
    if fmt == "mooncake":
        requests = load_mooncake(p, block_size)
    elif fmt == "azure":
        requests = load_azure(p)
    else:
        raise TraceError(f"unknown trace format {fmt!r}; expected mooncake or azure")
    if not requests:
        raise TraceError(f"{p}: no requests")
    t0 = min(r.arrival_s for r in requests)
    for r in requests:
        r.arrival_s -= t0
    requests.sort(key=lambda r: r.arrival_s)
    return requests

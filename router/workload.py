"""Requests for the load generator: synthetic, or replayed from a public trace.

Traces carry lengths and (Mooncake) prefix block ids but no text, so prompts are synthesized:
each "token" is one word from a list of short English words (each one BPE token with its
leading space in common vocabularies, so word counts approximate token counts). For Mooncake
traces a block id always expands to the same words, so two prompts share a text prefix exactly
where their ``hash_ids`` match, which is what a prefix cache and a cache-aware router react to.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "get",
    "through",
    "back",
    "much",
    "before",
    "go",
    "good",
    "new",
    "write",
    "our",
    "used",
    "me",
    "man",
    "too",
    "any",
    "day",
    "same",
    "right",
    "look",
    "think",
    "also",
    "around",
    "another",
    "came",
    "come",
    "work",
    "three",
    "word",
    "must",
    "because",
    "does",
    "part",
    "even",
    "place",
    "well",
    "such",
    "here",
    "take",
    "why",
    "things",
    "help",
    "put",
    "years",
    "different",
    "away",
    "again",
    "off",
    "went",
    "old",
    "number",
    "great",
    "tell",
    "men",
    "say",
    "small",
    "every",
    "found",
    "still",
    "between",
    "name",
    "should",
    "home",
    "big",
    "give",
    "air",
    "line",
]
MOONCAKE_BLOCK = 512


@dataclass
class WorkItem:
    prompt: str
    max_tokens: int
    at_s: float | None = None  # arrival time from the trace, seconds from its start


def _words(rng: random.Random, n: int) -> list[str]:
    return [WORDS[rng.randrange(len(WORDS))] for _ in range(n)]


def _text(words: list[str]) -> str:
    return " " + " ".join(words) if words else " hello"


def synthetic(n: int, input_tokens: int, output_tokens: int, seed: int = 0) -> list[WorkItem]:
    rng = random.Random(seed)
    return [WorkItem(_text(_words(rng, input_tokens)), output_tokens) for _ in range(n)]


def mooncake(
    path: Path, limit: int | None, block_tokens: int = MOONCAKE_BLOCK, max_output: int | None = None
) -> list[WorkItem]:
    """Mooncake jsonl: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids`` over
    512-token blocks. ``block_tokens`` rescales every block (and the lengths with it) so a small
    model can replay a long-context trace with the same sharing structure."""
    scale = block_tokens / MOONCAKE_BLOCK
    blocks: dict[int, list[str]] = {}
    items = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            length = max(1, round(row["input_length"] * scale))
            words: list[str] = []
            for hash_id in row["hash_ids"]:
                if len(words) >= length:
                    break
                block = blocks.get(hash_id)
                if block is None:
                    block = blocks[hash_id] = _words(random.Random(hash_id), block_tokens)
                words.extend(block[: length - len(words)])
            output = max(1, int(row["output_length"]))
            if max_output is not None:
                output = min(output, max_output)
            items.append(WorkItem(_text(words), output, row["timestamp"] / 1000.0))
            if limit is not None and len(items) >= limit:
                break
    return items


def azure(
    path: Path, limit: int | None, scale: float = 1.0, max_output: int | None = None, seed: int = 0
) -> list[WorkItem]:
    """Azure LLM inference csv: TIMESTAMP, ContextTokens, GeneratedTokens (no prefix info, so every
    prompt is fresh random words)."""
    rng = random.Random(seed)
    items = []
    start: datetime | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
            start = start or stamp
            length = max(1, round(int(row["ContextTokens"]) * scale))
            output = max(1, int(row["GeneratedTokens"]))
            if max_output is not None:
                output = min(output, max_output)
            items.append(WorkItem(_text(_words(rng, length)), output, (stamp - start).total_seconds()))
            if limit is not None and len(items) >= limit:
                break
    return items


def load_trace(
    path: Path, fmt: str | None, limit: int | None, block_tokens: int, max_output: int | None
) -> list[WorkItem]:
    fmt = fmt or ("azure" if path.suffix == ".csv" else "mooncake")
    if fmt == "mooncake":
        return mooncake(path, limit, block_tokens, max_output)
    if fmt == "azure":
        return azure(path, limit, block_tokens / MOONCAKE_BLOCK, max_output)
    raise ValueError(f"unknown trace format {fmt!r}; use mooncake or azure")

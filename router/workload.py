"""Requests for the load generator: synthetic, or replayed from a public trace.

Traces carry lengths and prefix block ids but no text, so prompts are synthesized: each
"token" is one word from a list of short English words, each one BPE token with its leading
space in common vocabularies (exactly one cl100k token, which the emulator uses), so a prompt
of n words is n tokens. Traces are read by ``tusk.router.sim.trace`` (one reader for the
simulator and the live replay); a block id always expands to the same words of the trace's
block size, so two prompts share a text prefix exactly where their ``hash_ids`` match, which
is what a prefix cache and a cache-aware router react to. Words past the hashed blocks (the
partial tail of kv-cache-tester prompts, every Azure prompt) are fresh for each request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tusk.router.sim.trace import TraceRequest
from tusk.router.sim.trace import load_trace as read_trace

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


@dataclass
class WorkItem:
    prompt: str
    max_tokens: int
    at_s: float | None = None  # arrival time from the trace, seconds from its start
    prompt_tokens: int | None = None  # words, i.e. tokens, when known


def _words(rng: random.Random, n: int) -> list[str]:
    return [WORDS[rng.randrange(len(WORDS))] for _ in range(n)]


def _text(words: list[str]) -> str:
    return " " + " ".join(words) if words else " hello"


def synthetic(n: int, input_tokens: int, output_tokens: int, seed: int = 0) -> list[WorkItem]:
    rng = random.Random(seed)
    return [WorkItem(_text(_words(rng, input_tokens)), output_tokens) for _ in range(n)]


def trace_items(requests: list[TraceRequest], max_output: int | None = None, seed: int = 0) -> list[WorkItem]:
    """Prompts for trace requests: block id ``h`` of a ``b``-token trace block is always the
    same ``b`` words (seeded by ``h``), a partial last block its first words."""
    blocks: dict[tuple[int, int], list[str]] = {}
    rng = random.Random(seed)
    items = []
    for r in requests:
        need = r.input_tokens
        words: list[str] = []
        b = r.trace_block_tokens
        for hid in r.hash_ids:
            if len(words) >= need:
                break
            block = blocks.get((hid, b))
            if block is None:
                block = blocks[(hid, b)] = _words(random.Random(hid * 7919 + b), b)
            words.extend(block[: need - len(words)])
        if len(words) < need:
            words.extend(_words(rng, need - len(words)))
        output = r.output_tokens if max_output is None else min(r.output_tokens, max_output)
        items.append(WorkItem(_text(words), max(1, output), r.arrival_s, need))
    return items


def load_trace(
    path: Path,
    fmt: str | None,
    limit: int | None,
    token_scale: int = 1,
    max_output: int | None = None,
    session_gap_s: float = 30.0,
    seed: int = 0,
) -> list[WorkItem]:
    """Any trace ``tusk.router.sim.trace`` reads, as prompts; ``token_scale`` shrinks prompts
    (one word stands for that many trace tokens, see ``WorkerProfile.scaled``)."""
    if token_scale < 1 or 64 % token_scale:
        raise ValueError("--token-scale must divide 64 (1, 2, 4, 8, 16, 32 or 64)")
    requests = read_trace(
        path,
        fmt,
        block_size=64 // token_scale,
        token_scale=token_scale,
        max_requests=limit,
        session_gap_s=session_gap_s,
        seed=seed,
    )
    return trace_items(requests, max_output, seed)

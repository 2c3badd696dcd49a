"""Tokenize a conversation once, not on every turn: a cache of text segments between special tokens.

A chat template renders the whole conversation on every turn, so a router that encodes the
rendered text re-tokenizes the same history again and again (2k tokens of history cost several
milliseconds of CPU each time). Hugging Face ``tokenizers`` splits the input at added tokens
(``<|im_start|>``, ``<|im_end|>`` ...) *before* normalizing and pre-tokenizing, and encodes every
piece between them on its own; so the ids of the whole text are exactly the concatenation of the
pieces' ids and the added tokens' ids. ``SegmentEncoder`` keeps the pieces' ids in an LRU keyed
by the piece's text: a new turn only encodes its new pieces.

It is used only where that identity holds by construction: no normalizer and no added token that
strips whitespace or matches single words (those move piece boundaries). The first encodings of
every encoder are also checked against a plain ``encode`` and the cache turns itself off for good
on any difference, so a tokenizer with an unforeseen quirk costs a few checks, never a wrong id.
"""

from __future__ import annotations

import asyncio
import logging
import re
from array import array
from collections import OrderedDict
from weakref import WeakKeyDictionary

from tokenizers import Tokenizer

log = logging.getLogger("tusk.router.token_cache")

SELF_CHECKS = 16
MAX_SEGMENTS = 8192


_encoders: WeakKeyDictionary[object, SegmentEncoder] = WeakKeyDictionary()


def segment_encoder(owner: object, tokenizer: Tokenizer) -> SegmentEncoder:
    """The encoder of ``owner`` (a ``ModelTokenizer``), created on first use."""
    encoder = _encoders.get(owner)
    if encoder is None:
        encoder = _encoders[owner] = SegmentEncoder(tokenizer)
    return encoder


class SegmentEncoder:
    """``encode(text)`` == ``tokenizer.encode(text, add_special_tokens=False).ids``, faster on
    texts that share pieces with earlier ones (multi-turn chats, shared system prompts)."""

    def __init__(self, tokenizer: Tokenizer, max_segments: int = MAX_SEGMENTS) -> None:
        self.tokenizer = tokenizer
        self.max_segments = max_segments
        self._cache: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()
        self._checks_left = SELF_CHECKS
        self.hits = 0
        self.misses = 0
        added = tokenizer.get_added_tokens_decoder()
        self.enabled = bool(added) and tokenizer.normalizer is None
        if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
            self.enabled = False
        self._ids = {t.content: i for i, t in added.items()}
        self._raw = {t: array("I", [i]).tobytes() for t, i in self._ids.items()}
        contents = sorted(self._ids, key=len, reverse=True)  # longest first, as tokenizers matches
        self._split = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")") if contents else None

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode(self, text: str) -> list[int]:
        if not self.enabled or self._split is None:
            return self._plain(text)
        parts, missing = self._plan(text)
        return self._assemble(text, parts, missing, self._encode_pieces(missing))

    async def encode_async(self, text: str, inline_chars: int) -> list[int]:
        """As ``encode``; pieces to encode that add up to ``inline_chars`` or more are encoded on
        a thread (``tokenizers`` releases the GIL), so a long new prompt does not stall the loop."""
        if not self.enabled or self._split is None:
            if len(text) < inline_chars:
                return self._plain(text)
            return await asyncio.to_thread(self._plain, text)
        parts, missing = self._plan(text)
        if sum(len(p) for p in missing) < inline_chars:
            encoded = self._encode_pieces(missing)
        else:
            encoded = await asyncio.to_thread(self._encode_pieces, missing)
        return self._assemble(text, parts, missing, encoded)

    def _plan(self, text: str) -> tuple[list[str], list[str]]:
        assert self._split is not None
        parts = self._split.split(text)
        cache = self._cache
        missing = [p for p in parts[::2] if p and p not in cache]  # even places: text pieces
        if len(missing) > 1:
            missing = list(dict.fromkeys(missing))
        return parts, missing

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        if not pieces:
            return []
        return [e.ids for e in self.tokenizer.encode_batch_fast(pieces, add_special_tokens=False)]

    def _assemble(
        self, text: str, parts: list[str], missing: list[str], encoded: list[list[int]]
    ) -> list[int]:
        cache = self._cache
        for piece, ids in zip(missing, encoded, strict=True):
            cache[piece] = (ids, array("I", ids).tobytes())
        self.misses += len(missing)
        out = TokenIds()
        raw: list[bytes] = []
        added, added_raw = self._ids, self._raw
        touch = cache.move_to_end
        extend, append, keep = out.extend, out.append, raw.append
        last = len(parts) - 1
        for i in range(0, last + 1, 2):  # text piece, then the added token that follows it
            piece = parts[i]
            if piece:
                ids, data = cache[piece]
                extend(ids)
                keep(data)
                touch(piece)
            if i < last:
                special = parts[i + 1]
                append(added[special])
                keep(added_raw[special])
        out.raw = b"".join(raw)
        self.hits += (len(parts) + 1) // 2 - len(missing)
        while len(cache) > self.max_segments:
            cache.popitem(last=False)
        if self._checks_left:
            self._checks_left -= 1
            if out != self._plain(text):
                log.warning("segment tokenization differs from plain encoding; cache disabled")
                self.enabled = False
                self._cache.clear()
                return self._plain(text)
        return out


class TokenIds(list):
    """Token ids that also carry their native ``array("I")`` bytes (``raw``), assembled from
    the segment cache's per-piece bytes: block hashing then needs no per-token conversion of
    the whole prompt (~20 us for 2k tokens)."""

    __slots__ = ("raw",)

    raw: bytes


class BlockHashCache:
    """``tusk.hashing.block_hashes`` with memory: a conversation's history hashes once.

    Hashing is chained (a block's hash covers its parent's), so ``(parent hash, block token
    bytes)`` determines a block's hash; the cache maps that pair to the hash ``hash_block``
    computed the first time. A hit costs a bytes slice and a dict probe instead of a BLAKE2b
    call wrapped in Python, about 30 times less for a 2k-token prompt seen before.

    Walking a 100-block history block by block still costs ~25 us of Python per request, so
    whole prefixes are remembered too, at every ``CHECKPOINT_BLOCKS``-th block: the exact bytes
    of the first k blocks map to their k hashes. A new turn of a known conversation finds its
    longest remembered checkpoint with one or two probes and walks only the blocks after it.
    """

    CHECKPOINT_BLOCKS = 32

    def __init__(self, max_entries: int = 1 << 18, max_prefixes: int = 4096) -> None:
        self.max_entries = max_entries
        self.max_prefixes = max_prefixes
        self._cache: dict[tuple[int, bytes], int] = {}
        self._prefixes: dict[tuple[int, bytes], list[int]] = {}

    def hashes(self, ids: list[int], block_size: int) -> list[int]:
        from tusk.hashing import ROOT_HASH, hash_block

        full = len(ids) - len(ids) % block_size
        if not full:
            return []
        raw = getattr(ids, "raw", None)
        if raw is not None and len(raw) == 4 * len(ids):
            data = raw[: full * 4] if full < len(ids) else raw
        else:
            data = array("I", ids[:full]).tobytes()
        step = block_size * 4
        blocks = full // block_size
        prefixes = self._prefixes
        every = self.CHECKPOINT_BLOCKS
        out: list[int] = []
        done = 0
        for k in range(blocks - blocks % every, 0, -every):  # longest remembered prefix first
            known = prefixes.get((block_size, data[: k * step]))
            if known is not None:
                out = known.copy()
                done = k
                break
        cache = self._cache
        parent = out[-1] if out else ROOT_HASH
        for b in range(done, blocks):
            start = b * step
            key = (parent, data[start : start + step])
            h = cache.get(key)
            if h is None:
                h = hash_block(parent, ids[b * block_size : (b + 1) * block_size])
                if len(cache) >= self.max_entries:
                    cache.clear()  # crude but O(1) amortized; hot prefixes come back at once
                cache[key] = h
            out.append(h)
            parent = h
            if not (b + 1) % every and b + 1 > done:
                if len(prefixes) >= self.max_prefixes:
                    prefixes.clear()
                prefixes[(block_size, data[: (b + 1) * step])] = out[: b + 1]
        return out


INLINE_HASH_TOKENS = 8192  # longer prompts are hashed on a thread: 100k tokens take ~50 ms
_HASHES = BlockHashCache()


async def prompt_block_hashes(ids: list[int], block_size: int) -> list[int]:
    """Block hashes of a prompt, memoized per block (shared history hashes once); a long prompt
    is hashed on a thread so it does not stall every other request."""
    if len(ids) < INLINE_HASH_TOKENS:
        return _HASHES.hashes(ids, block_size)
    from tusk.hashing import block_hashes

    return await asyncio.to_thread(block_hashes, ids, block_size)

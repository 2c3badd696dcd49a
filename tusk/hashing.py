"""Block hashing shared by router, worker and KV tier.

A prompt is cut into fixed-size token blocks. Block ``i``'s hash covers the hash of block
``i-1``, the block's token ids and optional extra keys (an adapter id, a tenant salt), so equal
hashes mean equal prefixes. The function must be identical on every process and machine, which
rules out Python's salted ``hash()``: we use BLAKE2b over a fixed little-endian encoding and keep
64 bits, enough to make collisions negligible for any realistic cache while staying a plain int
that the router's index can store cheaply.

Changing anything here invalidates every cached block in every deployment, so golden vectors in
``tests/unit/test_hashing.py`` pin the output.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence

HASH_VERSION = 1
ROOT_HASH = 0
_DIGEST_BYTES = 8
_PERSON = b"tusk-kv-v1"


def _extra_bytes(extra_keys: Sequence[str | bytes | int] | None) -> bytes:
    if not extra_keys:
        return b""
    parts = []
    for key in extra_keys:
        if isinstance(key, int):
            raw = b"i" + key.to_bytes(16, "little", signed=True)
        elif isinstance(key, str):
            raw = b"s" + key.encode()
        else:
            raw = b"b" + bytes(key)
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def hash_block(parent: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash one block given its parent's hash; ``extra`` is pre-encoded extra keys."""
    tokens = array("I", token_ids)
    if tokens.itemsize != 4:  # pragma: no cover - array('I') is 4 bytes on every supported platform
        raise RuntimeError("unsigned int is not 32-bit on this platform")
    if array("I", [1]).tobytes() != b"\x01\x00\x00\x00":  # pragma: no cover - big-endian hosts
        tokens.byteswap()
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=_PERSON)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack("<II", len(tokens), len(extra)))
    h.update(extra)
    h.update(tokens.tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str | bytes | int] | None = None,
    parent: int = ROOT_HASH,
) -> list[int]:
    """Hashes of every *full* block of ``token_ids``; a trailing partial block is not hashed.

    Partial blocks are never shared: their KV would change as soon as the next token lands.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    extra = _extra_bytes(extra_keys)
    hashes: list[int] = []
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        hashes.append(parent)
    return hashes


def format_hash(block_hash: int) -> str:
    """Fixed-width hex form used in KV tier keys and logs."""
    return f"{block_hash:016x}"

"""The KV tier's key and value format, one definition for every writer and reader.

Keys carry a *model fingerprint* so that workers whose KV is not interchangeable (another model,
dtype, layout or block size) can never read each other's blocks: a mismatch is simply a miss.
Values carry a small header so that a truncated, stale or corrupted value is detected and treated
as a miss rather than decoded into wrong attention state.

Value layout (little-endian)::

    magic  b"TKV"   3 bytes
    version         u8
    dtype code      u8
    ndim            u8
    reserved        u16
    payload bytes   u64
    crc32(payload)  u32
    shape           ndim x u32
    payload         payload bytes

This module is torch-free so the router and tools can use it; the worker converts tensors to and
from the (dtype name, shape, bytes) triple.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from tusk.hashing import HASH_VERSION, format_hash

try:  # ISA-L's CRC-32 is the same function as zlib's, 10-15x faster (the tier's hot path)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a worker dependency; zlib gives equal values
    from zlib import crc32

FORMAT_VERSION = 1
MAGIC = b"TKV"
KEY_PREFIX = "tusk:kv"

DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float8_e4m3fn": 4,
    "float8_e5m2": 5,
    "int8": 6,
    "uint8": 7,
}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

_FIXED = struct.Struct("<3sBBBHQI")
HEADER_FIXED_BYTES = _FIXED.size


class CorruptBlock(ValueError):
    """A value that is not a well-formed, intact block; callers treat it as a cache miss."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that decides whether two workers' KV blocks are interchangeable."""

    model: str  # model identity: repo id and revision, or a digest of config + weights
    dtype: str  # KV cache dtype
    layout: str  # block layout name, e.g. "LKHTD" for layers x K/V x heads x tokens x dim
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def digest(self) -> str:
        canonical = json.dumps(
            {**self.__dict__, "hash_version": HASH_VERSION, "format_version": FORMAT_VERSION},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def block_key(fingerprint: ModelFingerprint | str, block_hash: int) -> str:
    """Redis key of one block: ``tusk:kv:<fingerprint digest>:<block hash hex>``."""
    fp = fingerprint if isinstance(fingerprint, str) else fingerprint.digest()
    return f"{KEY_PREFIX}:{fp}:{format_hash(block_hash)}"


@dataclass(frozen=True)
class BlockHeader:
    dtype: str
    shape: tuple[int, ...]
    payload_bytes: int
    checksum: int
    version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        return HEADER_FIXED_BYTES + 4 * len(self.shape)


def encode_header(dtype: str, shape: tuple[int, ...], payload: bytes | memoryview) -> bytes:
    """Header bytes for ``payload``; sent before the payload so the payload is never copied."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported KV dtype {dtype!r}; known: {sorted(DTYPE_CODES)}")
    view = memoryview(payload).cast("B")
    expected = DTYPE_SIZES[dtype]
    for dim in shape:
        expected *= dim
    if expected != view.nbytes:
        raise ValueError(f"shape {shape} of {dtype} needs {expected} bytes, payload has {view.nbytes}")
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, DTYPE_CODES[dtype], len(shape), 0, view.nbytes, crc32(view))
    return fixed + struct.pack(f"<{len(shape)}I", *shape)


def encode_block(dtype: str, shape: tuple[int, ...], payload: bytes | memoryview) -> bytes:
    """Header and payload as one value (one copy; use ``encode_header`` to avoid it)."""
    return encode_header(dtype, shape, payload) + bytes(memoryview(payload).cast("B"))


def decode_block(value: bytes | memoryview) -> tuple[BlockHeader, memoryview]:
    """Validate a stored value and return its header and a zero-copy view of the payload.

    Raises ``CorruptBlock`` for anything that is not an intact block of this format version.
    """
    view = memoryview(value).cast("B")
    if view.nbytes < HEADER_FIXED_BYTES:
        raise CorruptBlock(f"value of {view.nbytes} bytes is shorter than a block header")
    magic, version, code, ndim, _reserved, nbytes, checksum = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"format version {version}, expected {FORMAT_VERSION}")
    if code not in DTYPE_NAMES:
        raise CorruptBlock(f"unknown dtype code {code}")
    shape_end = HEADER_FIXED_BYTES + 4 * ndim
    if view.nbytes != shape_end + nbytes:
        raise CorruptBlock(f"length {view.nbytes} does not match header ({shape_end + nbytes})")
    shape = struct.unpack_from(f"<{ndim}I", view, HEADER_FIXED_BYTES)
    dtype = DTYPE_NAMES[code]
    expected = DTYPE_SIZES[dtype]
    for dim in shape:
        expected *= dim
    if expected != nbytes:
        raise CorruptBlock(f"shape {shape} of {dtype} does not match {nbytes} payload bytes")
    payload = view[shape_end:]
    if crc32(payload) != checksum:
        raise CorruptBlock("checksum mismatch")
    return BlockHeader(dtype, tuple(shape), nbytes, checksum, version), payload

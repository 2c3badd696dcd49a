"""The KV tier value format: round trips, and every kind of damage is detected."""

from __future__ import annotations

import struct

import pytest

from tusk.kvformat import (
    HEADER_FIXED_BYTES,
    CorruptBlock,
    ModelFingerprint,
    block_key,
    decode_block,
    encode_block,
    encode_header,
)

FP = ModelFingerprint("tiny", "float32", "LKTHD", 16, 4, 2, 32)


def test_fingerprint_is_stable_and_sensitive():
    assert FP.digest() == "42ac75ea666bbca2"
    assert FP.digest() != ModelFingerprint("tiny", "bfloat16", "LKTHD", 16, 4, 2, 32).digest()
    assert FP.digest() != ModelFingerprint("tiny", "float32", "LKTHD", 32, 4, 2, 32).digest()
    assert FP.digest() != ModelFingerprint("other", "float32", "LKTHD", 16, 4, 2, 32).digest()


def test_key_layout():
    assert block_key(FP, 0xABC) == "tusk:kv:42ac75ea666bbca2:0000000000000abc"
    assert block_key("fp", 1) == "tusk:kv:fp:0000000000000001"


@pytest.mark.parametrize(
    ("dtype", "shape", "itemsize"),
    [
        ("float32", (4, 2, 16, 2, 32), 4),
        ("bfloat16", (2, 2, 16, 8, 128), 2),
        ("float16", (3,), 2),
        ("uint8", (7, 1), 1),
    ],
)
def test_round_trip(dtype, shape, itemsize):
    n = itemsize
    for d in shape:
        n *= d
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    header, view = decode_block(encode_block(dtype, shape, payload))
    assert (header.dtype, header.shape, header.payload_bytes) == (dtype, shape, n)
    assert bytes(view) == payload
    assert len(encode_header(dtype, shape, payload)) == header.size


def test_header_plus_payload_equals_block():
    payload = bytes(64)
    assert encode_header("float32", (16,), payload) + payload == encode_block("float32", (16,), payload)


def test_payload_view_is_zero_copy():
    value = bytearray(encode_block("float32", (4,), bytes(16)))
    _, view = decode_block(value)
    assert view.obj is value


def test_shape_mismatch_is_refused_at_encode():
    with pytest.raises(ValueError, match="needs 64 bytes"):
        encode_block("float32", (16,), bytes(60))
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        encode_block("complex64", (1,), bytes(8))


def _good() -> bytearray:
    return bytearray(encode_block("float32", (2, 4), bytes(range(32))))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda v: v.__setitem__(slice(0, 3), b"XYZ"), "magic"),
        (lambda v: v.__setitem__(3, 9), "format version"),
        (lambda v: v.__setitem__(4, 200), "dtype code"),
        (lambda v: v.__setitem__(-1, v[-1] ^ 0xFF), "checksum"),
        (lambda v: v.extend(b"\0"), "length"),
        (lambda v: v.__delitem__(slice(-4, None)), "length"),
        (
            lambda v: v.__setitem__(slice(HEADER_FIXED_BYTES, HEADER_FIXED_BYTES + 4), struct.pack("<I", 3)),
            "shape",
        ),
        (lambda v: v.__delitem__(slice(5, None)), "shorter than a block header"),
    ],
)
def test_damage_is_detected(damage, message):
    value = _good()
    damage(value)
    with pytest.raises(CorruptBlock, match=message):
        decode_block(value)

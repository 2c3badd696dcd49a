"""Block hashing is a cross-process, cross-machine contract: these vectors must never change
silently (a change orphans every cached block in every deployment)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tusk.hashing import ROOT_HASH, block_hashes, format_hash, hash_block

GOLDEN = [
    ((list(range(32)), 16, None), ["b488cb1a94710841", "0f0c393ca7bb68fb"]),
    (([1, 2, 3, 4], 2, ["lora-a"]), ["f67fed9f80b2cc4f", "631f37bf915b19a2"]),
    (([100257] * 8, 4, [7, b"x"]), ["228453b613b51c1e", "0175466be44efc41"]),
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_golden_vectors(args, expected):
    tokens, block_size, extra = args
    assert [format_hash(h) for h in block_hashes(tokens, block_size, extra)] == expected


def test_only_full_blocks_are_hashed():
    assert block_hashes(list(range(15)), 16) == []
    assert len(block_hashes(list(range(33)), 16)) == 2


def test_hash_is_chained_over_the_prefix():
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([9] * 16 + [2] * 16, 16)
    assert a[1] != b[1], "same block after a different prefix must hash differently"
    assert block_hashes([1] * 16 + [2] * 16 + [3] * 16, 16)[:2] == a, "a prefix's hashes are a prefix"


def test_extra_keys_separate_namespaces():
    tokens = list(range(16))
    assert block_hashes(tokens, 16) != block_hashes(tokens, 16, ["adapter-1"])
    assert block_hashes(tokens, 16, ["a"]) != block_hashes(tokens, 16, [b"a"])
    assert block_hashes(tokens, 16, ["ab", "c"]) != block_hashes(tokens, 16, ["a", "bc"])


def test_parent_and_chunking_compose():
    tokens = list(range(48))
    whole = block_hashes(tokens, 16)
    first = block_hashes(tokens[:16], 16)
    rest = block_hashes(tokens[16:], 16, parent=first[-1])
    assert whole == first + rest
    assert hash_block(ROOT_HASH, tokens[:16]) == whole[0]


def test_stable_across_processes():
    code = "from tusk.hashing import block_hashes; print(block_hashes(list(range(32)), 16))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1


def test_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)


def test_token_ids_must_fit_uint32():
    with pytest.raises(OverflowError):
        block_hashes([2**32], 1)

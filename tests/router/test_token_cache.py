"""The segment cache tokenizes exactly like a plain encode, and only new pieces on a new turn."""

from __future__ import annotations

import random
from array import array
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tusk.router.token_cache import BlockHashCache, SegmentEncoder, TokenIds
from tusk.router.tokenizer import ModelTokenizer

from tusk.hashing import block_hashes

PIECES = [
    "hello",
    " world",
    "  spaced  ",
    "\n\n",
    "naïve café ☕",
    "日本語",
    "<|im_end",
    "|>",
    "x" * 50,
    "12345678",
]


async def test_same_ids_as_plain_encoding_and_history_is_cached(tiny_model: Path) -> None:
    tok = ModelTokenizer.from_dir(tiny_model)
    encoder = SegmentEncoder(tok.tokenizer)
    assert encoder.enabled
    rng = random.Random(3)
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for turn in range(40):
        messages.append({"role": "user", "content": "".join(rng.choices(PIECES, k=rng.randint(0, 12)))})
        text = tok.render_chat(messages)
        plain = tok.tokenizer.encode(text, add_special_tokens=False).ids
        assert encoder.encode(text) == plain, turn
        assert await encoder.encode_async(text, inline_chars=64) == plain
        messages.append({"role": "assistant", "content": "".join(rng.choices(PIECES, k=5))})
    misses = encoder.misses
    messages.append({"role": "user", "content": "one more question"})
    encoder.encode(tok.render_chat(messages))
    assert encoder.misses - misses <= 2  # only the new turn's pieces were encoded
    assert encoder.enabled  # every self-check agreed


def test_off_where_the_identity_does_not_hold(tiny_model: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|strip|>", lstrip=True)])
    encoder = SegmentEncoder(tok)
    assert not encoder.enabled
    text = "a  <|strip|> b"
    assert encoder.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_block_hashes_match_the_plain_function_across_turns(tiny_model: Path) -> None:
    """Memoized hashes (per block and per remembered prefix, from the encoder's bytes or from a
    plain list) equal ``tusk.hashing.block_hashes``, also when the caches overflow."""
    tok = ModelTokenizer.from_dir(tiny_model)
    encoder = SegmentEncoder(tok.tokenizer)
    cache = BlockHashCache(max_entries=300, max_prefixes=5)
    cache.CHECKPOINT_BLOCKS = 4  # many checkpoints on short prompts
    rng = random.Random(5)
    messages = [{"role": "system", "content": "x" * 200}]
    for turn in range(30):
        messages.append({"role": "user", "content": "".join(rng.choices(PIECES, k=rng.randint(1, 30)))})
        ids = encoder.encode(tok.render_chat(messages))
        assert isinstance(ids, TokenIds) and ids.raw == array("I", ids).tobytes()
        for block_size in (4, 16):
            expected = block_hashes(ids, block_size)
            assert cache.hashes(ids, block_size) == expected, turn
            assert cache.hashes(list(ids), block_size) == expected  # no bytes: converted
            assert cache.hashes(ids[: len(ids) // 2], block_size) == expected[: len(ids) // 2 // block_size]
        if rng.random() < 0.3:  # a different conversation shares nothing but the system prompt
            messages = messages[:1]


def test_record_route_equals_adding_each_block(tiny_model: Path) -> None:
    """The inlined ``record_route`` keeps ``_add``'s semantics: LRU order, eviction, holders,
    and a route confirming a claim."""
    from tusk.router.prefix_index import PrefixIndex

    rng = random.Random(7)
    fast, slow = PrefixIndex(max_blocks_per_worker=12), PrefixIndex(max_blocks_per_worker=12)
    for step in range(300):
        worker = rng.choice("ab")
        hashes = rng.sample(range(30), rng.randint(0, 8))
        if rng.random() < 0.3:
            fast.claim(worker, hashes, 60.0)
            slow.claim(worker, hashes, 60.0)
        else:
            fast.record_route(worker, hashes)
            slot = slow._slot(worker)
            for h in reversed(hashes):
                slow._add(slot, h, 1)
        assert fast._holders == slow._holders, step
        assert {s: list(b.items()) for s, b in fast._blocks.items()} == {
            s: list(b.items()) for s, b in slow._blocks.items()
        }, step

"""The segment cache tokenizes exactly like a plain encode, and only new pieces on a new turn."""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tusk.router.token_cache import SegmentEncoder
from tusk.router.tokenizer import ModelTokenizer

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

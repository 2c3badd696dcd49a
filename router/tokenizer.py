"""Text <-> tokens for one served model: chat template, encoding and streaming decoding.

The router owns text (workers see only token ids), so this module is where Hugging Face's
conventions have to be reproduced faithfully: the chat template is the jinja2 template from
``chat_template.jinja`` or ``tokenizer_config.json`` rendered in transformers' Jinja environment
(see ``chat_template.py``) with ``messages``, ``add_generation_prompt`` and the special tokens;
prompts rendered from a template are encoded without extra special tokens (the
template already placed them). Files come either from a local folder or from a worker's
GetModelInfo RPC, so a router in a cluster needs no copy of the model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from tusk.router.chat_template import TEMPLATE_FILE, ChatTemplate, ChatTemplateError, select_template
from tusk.router.errors import bad_request

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", TEMPLATE_FILE)
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(RuntimeError):
    """The model's tokenizer files are missing or unusable."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ModelTokenizer:
    """Everything text-shaped the router needs for one model."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        if "tokenizer.json" not in files:
            raise TokenizerError("tokenizer.json is missing")
        try:
            self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"tokenizer.json is not a valid tokenizer: {exc}") from exc
        config = json.loads(files.get("tokenizer_config.json", b"{}") or b"{}")
        generation = json.loads(files.get("generation_config.json", b"{}") or b"{}")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.max_model_len = config.get("model_max_length")
        if not isinstance(self.max_model_len, int) or self.max_model_len > 1 << 30:
            self.max_model_len = None
        self.eos_token_ids = self._eos_ids(generation)
        special = {k: v for k in SPECIAL_TOKEN_KEYS if (v := _token_text(config.get(k))) is not None}
        try:
            source = select_template(dict(files), config)
            self._template = ChatTemplate(source, special) if source else None
        except ChatTemplateError as exc:
            raise TokenizerError(str(exc)) from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelTokenizer:
        """Load from a folder; cached per folder and file version, since a 100k-vocab tokenizer
        takes about a second to build and several served names may share one folder."""
        folder = Path(path).resolve()
        main = folder / "tokenizer.json"
        if not main.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}")
        return _load_dir(folder, main.stat().st_mtime_ns)

    def _eos_ids(self, generation: dict[str, Any]) -> list[int]:
        raw = generation.get("eos_token_id")
        ids = raw if isinstance(raw, list) else [raw] if isinstance(raw, int) else []
        if self.eos_token is not None:
            token_id = self.tokenizer.token_to_id(self.eos_token)
            if token_id is not None:
                ids.append(token_id)
        return sorted(set(ids))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            raise bad_request(
                "This model has no chat template; use /v1/completions instead.", param="messages"
            )
        try:
            return self._template.render(messages, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # Whatever a template raises on odd messages is the client's 400, never a 500.
            raise bad_request(f"The chat template rejected these messages: {exc}", param="messages") from None

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # The batch "fast" path skips character offsets, which the router never uses: ~25% less
        # time on the request path's single most expensive step.
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self.tokenizer)


@functools.lru_cache(maxsize=16)
def _load_dir(folder: Path, _version: int) -> ModelTokenizer:
    files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    return ModelTokenizer(files)


class Detokenizer:
    """Streaming decoder that only ever emits whole characters.

    Byte-level BPE splits a multi-byte character across tokens; ``DecodeStream`` buffers the
    bytes until they form valid UTF-8, so a client never sees a half character mid-stream.
    Bytes that never complete (a model can emit any byte sequence) are released by ``flush``
    at the end, as U+FFFD like a plain ``decode``, so the final text equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters handed out so far

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        parts = []
        for token_id in token_ids:
            piece = self._stream.step(self._tokenizer, token_id)
            if piece:
                parts.append(piece)
        text = "".join(parts)
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """Whatever is still held back once no more tokens will come."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest

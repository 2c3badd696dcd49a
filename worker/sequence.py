"""A request's state as it moves through the engine: tokens, KV blocks and where it stands."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tusk.hashing import ROOT_HASH, block_hashes


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    LOADING_KV = "loading_kv"  # blocks reserved, prefix being fetched from the KV tier
    RUNNING = "running"  # holds blocks and is scheduled every step
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled, drained, or can no longer be served


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class Sequence:
    """One request. ``tokens`` is prompt + generated; every token but the last has KV once computed."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    extra_keys: tuple[str, ...] = ()
    # Tokens sampled elsewhere (a prefill worker's first token): already emitted, never re-sampled.
    preset_outputs: int = 0
    prefill_only: bool = False
    arrival: float = field(default_factory=time.monotonic)

    tokens: list[int] = field(init=False)
    status: SeqStatus = field(init=False, default=SeqStatus.WAITING)
    finish_reason: FinishReason | None = field(init=False, default=None)
    block_table: list[int] = field(init=False, default_factory=list)
    num_computed: int = field(init=False, default=0)
    # Prompt tokens whose KV came from a cache (device or tier) at the first admission.
    num_cached_prompt: int = field(init=False, default=-1)
    num_tier_blocks: int = field(init=False, default=0)
    hashes: list[int] = field(init=False, default_factory=list)
    first_token_time: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def num_outputs(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def outputs(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def full_block_hashes(self, block_size: int) -> list[int]:
        """Hashes of every full block of ``tokens``, extended incrementally as tokens arrive."""
        full = len(self.tokens) // block_size
        if len(self.hashes) < full:
            start = len(self.hashes) * block_size
            parent = self.hashes[-1] if self.hashes else ROOT_HASH
            self.hashes += block_hashes(
                self.tokens[start : full * block_size], block_size, list(self.extra_keys) or None, parent
            )
        return self.hashes

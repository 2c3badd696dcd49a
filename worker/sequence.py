"""A request's state as it moves through the engine: tokens, KV blocks and where it stands."""

from __future__ import annotations

import enum
import math
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
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = no logprobs; n = the sampled token's plus the top n

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


MAX_LOGPROBS = 20  # as OpenAI's top_logprobs and vLLM's default max_logprobs


def check_sampling(sp: SamplingParams) -> str | None:
    """Why these parameters cannot be honoured, or None. NaN and infinities are refused here too:
    a NaN temperature would otherwise turn every logit into NaN and emit the last token forever."""
    floats = {
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "min_p": sp.min_p,
        "repetition_penalty": sp.repetition_penalty,
        "presence_penalty": sp.presence_penalty,
        "frequency_penalty": sp.frequency_penalty,
    }
    bad = [name for name, value in floats.items() if not math.isfinite(value)]
    if bad:
        return f"{', '.join(bad)} must be finite numbers"
    if sp.temperature < 0 or sp.top_p < 0 or sp.top_k < 0:
        return "temperature, top_p and top_k must not be negative"
    if not 0 <= sp.min_p <= 1:
        return f"min_p must be in [0, 1], got {sp.min_p}"
    if sp.repetition_penalty <= 0:
        return f"repetition_penalty must be > 0, got {sp.repetition_penalty}"
    if not (-2 <= sp.presence_penalty <= 2 and -2 <= sp.frequency_penalty <= 2):
        return "presence_penalty and frequency_penalty must be in [-2, 2]"
    if sp.min_tokens < 0 or sp.min_tokens > sp.max_tokens:
        return f"min_tokens must be in [0, max_tokens={sp.max_tokens}], got {sp.min_tokens}"
    if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_LOGPROBS:
        return f"logprobs must be in [0, {MAX_LOGPROBS}], got {sp.logprobs}"
    return None


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
    # Timings reported to the router (monotonic seconds): when the first step computed any of
    # its tokens, the step time spent computing it before its first token here, and how long
    # its prefix took to load from the KV tier / host cache.
    first_scheduled: float | None = field(init=False, default=None)
    prefill_compute_s: float = field(init=False, default=0.0)
    kv_load_s: float = field(init=False, default=0.0)

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

    def timings(self) -> tuple[float, float, float]:
        """(queue_s, prefill_s, handoff_s) as the worker protocol reports them, 0 = not measured.

        Measured apart so the router's P/D model never mistakes one for another: queueing is
        admission to the first step that computed the request, less the KV load; prefill is
        the compute of the steps before its first token here; the handoff is the KV load of a
        decode continuation (a remote prefill's blocks), never of an aggregated request.
        """
        handoff = self.kv_load_s if self.preset_outputs else 0.0
        if self.first_scheduled is None:
            return 0.0, 0.0, handoff
        queue = max(0.0, self.first_scheduled - self.arrival - self.kv_load_s)
        return queue, self.prefill_compute_s, handoff

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

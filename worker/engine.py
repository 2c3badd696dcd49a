"""``LLMEngine``: load a model, own the paged KV cache, and advance all requests one step at a time.

The engine is synchronous and single-threaded on purpose: ``step()`` is the only thing that
touches the scheduler, block manager and KV cache. Other threads (the gRPC server's event loop)
talk to it only through ``add_request`` / ``abort`` / ``call_soon``, which queue work for the
next step, so no lock is ever held across a forward pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tusk.kernels as K
from tusk.kernels.sampling_core import reseed_process_generator
from tusk.kernels.sampling_penalties import TokenLogprobs
from tusk.worker import loader
from tusk.worker.block_manager import BlockManager
from tusk.worker.connector import KvConnector, TierConnector
from tusk.worker.kv_transfer import kv_fingerprint
from tusk.worker.model_runner import ModelRunner
from tusk.worker.models.llama import LlamaModel
from tusk.worker.scheduler import Scheduler, prefill_remainder
from tusk.worker.sequence import FinishReason, SamplingParams, Sequence, check_sampling

from tusk.config import EngineConfig, KVTierConfig, Role
from tusk.kvformat import ModelFingerprint

log = logging.getLogger("tusk.worker.engine")

_CPU_KV_BYTES_CAP = 1 << 30


class InvalidRequest(ValueError):
    """The request can never be served as sent; the message says why (maps to INVALID_ARGUMENT)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (device cache or tier)
    computed_tokens: int = 0
    block_hashes: list[int] = field(default_factory=list)  # full prompt blocks (prefill results)
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    # Set on a request's first output (Sequence.timings): seconds queued, of prefill compute,
    # and of KV handoff (decode continuations only); 0 = not measured.
    queue_s: float = 0.0
    prefill_s: float = 0.0
    handoff_s: float = 0.0


@dataclass
class KvEventRecord:
    stored: bool
    medium: str  # "device", "host" or "tier"
    block_hashes: list[int]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    from tusk.kernels.device import default_device

    return default_device()


class LLMEngine:
    def __init__(
        self,
        model: str | Path,
        config: EngineConfig | None = None,
        role: Role = Role.BOTH,
        connector_factory: Callable[[LLMEngine], KvConnector | None] | None = None,
        kv_tier: KVTierConfig | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``kv_tier`` attaches the host cache / shared tier (built on ``loop``, or on a private
        background loop); ``connector_factory`` attaches any other ``KvConnector`` instead."""
        self.config = config = config or EngineConfig()
        self.role = Role(role)
        if config.kernel_backend:
            K.force_backend(config.kernel_backend)
        reseed_process_generator(config.seed)
        self.folder = loader.resolve_model_path(str(model))
        self.spec = spec = loader.load_spec(self.folder)
        self.device = pick_device(config.device)
        self.dtype = loader.choose_dtype(config.dtype, spec, self.device)

        limit = spec.context_limit
        if config.max_model_len and config.max_model_len > limit:
            raise loader.ModelLoadError(
                f"max_model_len {config.max_model_len} exceeds what the model supports ({limit})"
            )
        self.max_model_len = config.max_model_len or limit
        self.block_size = config.block_size

        started = time.monotonic()
        weights = loader.load_weights(self.folder, self.dtype, self.device)
        self.model = LlamaModel(spec, weights, self.max_model_len)
        if config.torch_compile:
            from tusk.worker.compiled import compile_model

            compile_model(self.model)
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        self.kv_cache = torch.zeros(
            (spec.num_layers, 2, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self.load_time_s = time.monotonic() - started
        self.model_id = loader.model_digest(self.folder)
        # Same fingerprint as the tier's keys use, whether or not a tier is attached.
        self.fingerprint: ModelFingerprint = kv_fingerprint(self.model_id, self.kv_cache)
        self.blocks = BlockManager(self.num_blocks, self.block_size)
        self.runner = ModelRunner(self.model, self.kv_cache, self.block_size, self.spec.eos_token_ids)
        self.connector: KvConnector | None = None
        if connector_factory is not None:
            self.connector = connector_factory(self)
        elif kv_tier is not None:
            self.connector = TierConnector.create(kv_tier, self.kv_cache, self.model_id, loop)
        self.write_through = self.connector is not None and self.role is not Role.DECODE
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, self.connector
        )

        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._wakeup = threading.Event()
        self._live: set[str] = set()
        self._live_lock = threading.Lock()
        self._pending_outputs: list[RequestOutput] = []
        # Requests (and their tokens) accepted by add_request / taken in by a step: the load
        # report counts those accepted but not yet in the scheduler as queued.
        self._submitted = [0, 0]  # under _live_lock
        self._admitted = [0, 0]  # step thread only
        self._events: list[KvEventRecord] = []
        # Counters and recent rates for the load report and metrics.
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self.last_batch_size = 0
        self.last_step_s = 0.0
        self.prefill_tokens_per_s = 0.0
        self.decode_step_s = 0.0
        # Arrival-to-first-sampled-token times, drained by the server into a histogram.
        self.recent_ttfts: collections.deque[float] = collections.deque(maxlen=4096)
        # Replaced (never mutated) after every step, so other threads can read it safely.
        self.last_stats: dict[str, float] = self.stats()
        log.info(
            "loaded %s (%s, %s on %s) in %.1fs; %d KV blocks of %d tokens",
            self.folder,
            spec.architecture,
            str(self.dtype),
            self.device,
            self.load_time_s,
            self.num_blocks,
            self.block_size,
        )

    # -- sizing ----------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        s = self.spec
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return s.num_layers * 2 * self.block_size * s.num_kv_heads * s.head_dim * elem

    def _blocks_from_memory(self) -> int:
        """Blocks that fit the configured memory fraction, never more than the engine could use."""
        fraction = self.config.kv_cache_memory_fraction
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = max(0, int(total * fraction) - (total - free))
        else:
            import os

            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(int(available * fraction), _CPU_KV_BYTES_CAP)
        useful = self.config.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        blocks = min(budget // self.bytes_per_block, useful)
        if blocks < 1:
            raise loader.ModelLoadError("no memory left for the KV cache; lower the model size or dtype")
        return int(blocks)

    # -- requests --------------------------------------------------------------------------
    def validate(self, prompt: list[int], sampling: SamplingParams, first_token: int | None = None) -> None:
        if not prompt:
            raise InvalidRequest("prompt is empty: send at least one token id")
        if sampling.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be > 0, got {sampling.max_tokens}")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len} "
                "(prompt must be shorter, to leave room for output)"
            )
        vocab = self.spec.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if first_token is not None and not 0 <= first_token < vocab:
            bad.append(first_token)
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        problem = check_sampling(sampling)
        if problem:
            raise InvalidRequest(problem)
        needed = -(-(len(prompt) + 1) // self.block_size)
        if needed > self.num_blocks:
            raise InvalidRequest(
                f"prompt needs {needed} KV blocks but this worker has only {self.num_blocks}"
            )

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams | None = None,
        *,
        first_token: int | None = None,
        extra_keys: Iterable[str] = (),
        prefill_only: bool = False,
    ) -> None:
        """Queue a request (validated now, scheduled at the next step). Raises InvalidRequest."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt]
        self.validate(prompt, sampling, first_token)
        with self._live_lock:
            if request_id in self._live:
                raise InvalidRequest(f"request id {request_id!r} is already running")
            self._live.add(request_id)
            self._submitted[0] += 1
            self._submitted[1] += len(prompt) + (first_token is not None)
        seq = Sequence(
            request_id,
            prompt,
            sampling,
            extra_keys=tuple(extra_keys),
            preset_outputs=0 if first_token is None else 1,
            prefill_only=prefill_only,
        )
        self._inbox.append(lambda: self._admit(seq, first_token))
        self._wakeup.set()

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its final output (finish_reason ABORT) comes from the next step."""
        with self._live_lock:
            found = request_id in self._live
        if found:
            self._inbox.append(lambda: self._abort(request_id))
            self._wakeup.set()
        return found

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the step thread before the next step (for state snapshots)."""
        self._inbox.append(fn)
        self._wakeup.set()

    def has_unfinished(self) -> bool:
        return bool(self._live) or bool(self._inbox)

    @property
    def num_live(self) -> int:
        return len(self._live)

    def wait_for_work(self, timeout: float) -> None:
        """Block the step thread until a request arrives (or ``timeout``) when there is nothing to do."""
        if not self.scheduler.has_work() and not self._inbox:
            self._wakeup.wait(timeout)
        self._wakeup.clear()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit/abort queued requests, run one batch, and return every request's new tokens."""
        while self._inbox:
            self._inbox.popleft()()
        outputs, self._pending_outputs = self._pending_outputs, []
        batch, dropped = self.scheduler.schedule()
        for seq in dropped:
            outputs.append(self._final(seq, []))
        if not batch:
            if self.scheduler.loading:
                time.sleep(0.0005)  # waiting only on the KV tier: do not spin hot
            self._collect_events()
            self.last_stats = self.stats()
            return outputs

        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled is None:
                item.seq.first_scheduled = now
        # Prefill work of this step, told apart before it runs (a 1-token chunk is prefill too).
        num_prefill = sum(item.num_tokens for item in batch if prefill_remainder(item.seq))
        started = time.perf_counter()
        sampled = self.runner.run(batch)
        elapsed = time.perf_counter() - started
        for item in batch:
            if item.seq.first_token_time is None:  # still prefilling here (chunks, or a recompute)
                item.seq.prefill_compute_s += elapsed
        self._note_step(len(batch), num_prefill, elapsed)

        new_full: list[tuple[Sequence, int, int]] = []  # (seq, block hash, block id)
        for item in batch:
            seq = item.seq
            before = seq.num_computed
            seq.num_computed += item.num_tokens
            self.num_prompt_tokens_computed += max(0, min(seq.num_computed, len(seq.prompt)) - before)
            self._register_full_blocks(seq, before, new_full)
        if new_full and self.write_through:
            # Before any sequence finishes below: its blocks are snapshotted while still its own.
            self._write_through(new_full)

        step_logprobs = self.runner.last_logprobs
        for index, (item, token) in enumerate(zip(batch, sampled, strict=True)):
            seq = item.seq
            if token is None:
                continue
            logprobs = [step_logprobs[index]] if index in step_logprobs else None
            seq.tokens.append(token)
            self.num_generated_tokens += 1
            first = seq.first_token_time is None
            if first:
                seq.first_token_time = time.monotonic()
                self.recent_ttfts.append(seq.first_token_time - seq.arrival)
            reason = self._stop_reason(seq, token)
            if reason is not None or seq.prefill_only:
                self.scheduler.finish(seq, reason or FinishReason.LENGTH)
                # A prefill that did not end the request reports no finish reason: it goes on
                # on a decode worker.
                final = self._final(seq, [token], reason, continues=reason is None)
                final.logprobs = logprobs
                outputs.append(final)
            else:
                out = RequestOutput(
                    seq.request_id,
                    [token],
                    False,
                    prompt_tokens=len(seq.prompt),
                    cached_tokens=max(seq.num_cached_prompt, 0),
                    logprobs=logprobs,
                )
                if first:
                    out.queue_s, out.prefill_s, out.handoff_s = seq.timings()
                outputs.append(out)
        self._collect_events()
        self.last_stats = self.stats()
        return outputs

    def _admit(self, seq: Sequence, first_token: int | None) -> None:
        self._admitted[0] += 1
        self._admitted[1] += len(seq.prompt) + (first_token is not None)
        if first_token is not None:
            seq.tokens.append(first_token)
            reason = self._stop_reason(seq, first_token)
            if reason is not None:
                seq.finish_reason = reason
                self._pending_outputs.append(self._final(seq, [], reason))
                return
        self.scheduler.add(seq)

    def _abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._pending_outputs.append(self._final(seq, [], FinishReason.ABORT))

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sampling
        if not sp.ignore_eos and token in self.spec.eos_token_ids:
            return FinishReason.STOP
        if token in sp.stop_token_ids:
            return FinishReason.STOP
        if seq.num_outputs >= sp.max_tokens or len(seq.tokens) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _register_full_blocks(self, seq: Sequence, before: int, new_full: list) -> None:
        bs = self.block_size
        first, last = before // bs, seq.num_computed // bs
        if last <= first:
            return
        hashes = seq.full_block_hashes(bs)
        for j in range(first, min(last, len(hashes))):
            block = seq.block_table[j]
            if self.blocks.register(block, hashes[j]) and j < len(seq.prompt) // bs:
                new_full.append((seq, hashes[j], block))

    def _write_through(self, new_full: list[tuple[Sequence, int, int]]) -> None:
        assert self.connector is not None
        by_request: dict[str, tuple[list[int], list[int]]] = {}
        for seq, block_hash, block in new_full:
            hashes, ids = by_request.setdefault(seq.request_id, ([], []))
            hashes.append(block_hash)
            ids.append(block)
        background = getattr(self.connector, "copies_in_background", False)
        for request_id, (hashes, ids) in by_request.items():
            # The connector copies the blocks off this thread: pin them until it has, unpin here.
            pinned = self.blocks.acquire_cached(hashes) if background else []
            if pinned and pinned == ids:
                unpin = lambda ids=ids: self.call_soon(lambda: self.blocks.release(ids))  # noqa: E731
                self.connector.save(request_id, hashes, ids, release=unpin)
                continue
            if pinned:
                self.blocks.release(pinned)
            self.connector.save(request_id, hashes, ids)

    def _final(
        self, seq: Sequence, tokens: list[int], reason: FinishReason | None = None, continues: bool = False
    ) -> RequestOutput:
        reason = None if continues else reason or seq.finish_reason or FinishReason.ABORT
        with self._live_lock:
            self._live.discard(seq.request_id)
        if self.connector is not None:
            self.connector.finish(seq.request_id, keep=seq.prefill_only and reason is not FinishReason.ABORT)
        prompt_hashes = seq.full_block_hashes(self.block_size)[: len(seq.prompt) // self.block_size]
        cached = max(seq.num_cached_prompt, 0)
        queue_s, prefill_s, handoff_s = seq.timings()
        return RequestOutput(
            seq.request_id,
            tokens,
            True,
            reason,
            prompt_tokens=len(seq.prompt),
            cached_tokens=cached,
            computed_tokens=len(seq.prompt) - cached,
            block_hashes=prompt_hashes,
            queue_s=queue_s,
            prefill_s=prefill_s,
            handoff_s=handoff_s,
        )

    def _note_step(self, batch_size: int, prefill_tokens: int, elapsed: float) -> None:
        """Rates for the load report: tokens per second over steps that prefilled (whole step
        time, decodes riding along included), and the time of steps that only decoded."""
        self.num_steps += 1
        self.last_batch_size = batch_size
        self.last_step_s = elapsed
        alpha = 0.2
        if prefill_tokens:
            rate = prefill_tokens / max(elapsed, 1e-9)
            self.prefill_tokens_per_s = (
                rate
                if not self.prefill_tokens_per_s
                else ((1 - alpha) * self.prefill_tokens_per_s + alpha * rate)
            )
        else:
            self.decode_step_s = (
                elapsed if not self.decode_step_s else ((1 - alpha) * self.decode_step_s + alpha * elapsed)
            )

    # -- KV events -------------------------------------------------------------------------
    def _collect_events(self) -> None:
        events = self.blocks.drain_events()
        i = 0
        while i < len(events):  # group runs of the same kind, keeping order
            j = i
            while j < len(events) and events[j].stored == events[i].stored:
                j += 1
            self._events.append(
                KvEventRecord(events[i].stored, "device", [e.block_hash for e in events[i:j]])
            )
            i = j

    def drain_kv_events(self) -> list[KvEventRecord]:
        """Events since the last call (step thread only; the server forwards them)."""
        events, self._events = self._events, []
        return events

    def cached_block_hashes(self) -> list[int]:
        """Hashes currently cached on the device (step thread only: call via ``call_soon``)."""
        return list(self.blocks._by_hash)

    # -- convenience -----------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
    ) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; returns generated token ids per prompt."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, sp in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, sp)
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id] += out.new_token_ids
                    if out.finished:
                        pending.discard(out.request_id)
        return [results[rid] for rid in ids]

    def stats(self) -> dict[str, float]:
        """Queue and cache figures (step thread; other threads read ``last_stats``)."""
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": s.num_queued,
            "queued_prefill_tokens": s.queued_prefill_tokens(),
            "free_blocks": self.blocks.num_free,
            "total_blocks": self.num_blocks,
            "cache_hit_tokens": s.cache_hit_tokens,
            "cache_query_tokens": s.cache_query_tokens,
            "tier_hit_tokens": s.tier_hit_tokens,
            "preemptions": s.num_preemptions,
            "admitted": self._admitted[0],
            "admitted_tokens": self._admitted[1],
        }

    def load(self) -> dict[str, int | float]:
        """The engine's LoadReport fields, by their protobuf names; the meanings are defined once,
        on ``LoadReport`` in tusk/protocol/worker.proto. Safe from any thread: the last step's
        figures plus the requests accepted since that step took its snapshot (no cache credit
        known for those yet)."""
        s = self.last_stats
        with self._live_lock:
            pending = self._submitted[0] - int(s["admitted"])
            pending_tokens = self._submitted[1] - int(s["admitted_tokens"])
        return {
            "running_requests": int(s["running"]),
            "queued_requests": int(s["waiting"]) + pending,
            "queued_prefill_tokens": int(s["queued_prefill_tokens"]) + pending_tokens,
            "free_blocks": int(s["free_blocks"]),
            "total_blocks": int(s["total_blocks"]),
            "cache_hit_tokens": int(s["cache_hit_tokens"]),
            "cache_query_tokens": int(s["cache_query_tokens"]),
            "prefill_tokens_per_s": float(self.prefill_tokens_per_s),
            "decode_step_s": float(self.decode_step_s),
        }

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()

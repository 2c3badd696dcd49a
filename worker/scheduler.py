"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step the scheduler picks, under a token budget, which sequences compute how many tokens:
running sequences first (decodes cost one token, unfinished prefills continue in chunks), then
waiting sequences in arrival order while blocks, budget and the sequence cap allow. Requests join
and leave between steps, so a long prompt never stalls the decodes of others for more than one
chunk.

When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are released (its full blocks stay cached, so re-admission usually hits them) and it
goes back to the front of the queue to be recomputed later. Nothing is ever overwritten while
referenced, so preemption costs time, never correctness.

With a KV tier connector, a waiting sequence whose prefix is not cached locally first reserves
blocks and asks the tier to fill them (``LOADING_KV``); the engine keeps stepping others meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, field

from tusk.worker.block_manager import BlockManager
from tusk.worker.connector import KvConnector
from tusk.worker.sequence import FinishReason, SeqStatus, Sequence


def prefill_remainder(seq: Sequence) -> int:
    """Tokens a running sequence must still compute before it samples, while it prefills (a
    prompt part-way through its chunks, a decode continuation after its KV handoff, a recompute
    after preemption); 0 once it decodes, its one uncomputed token being the decode itself.

    A first prefill is told apart by not having sampled here yet; a recompute with a single token
    left looks like a decode and counts 0."""
    left = seq.num_uncomputed
    return left if seq.first_token_time is None or left > 1 else 0


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.tokens)


@dataclass
class _Loading:
    seq: Sequence
    future: concurrent.futures.Future[int]
    first_block: int  # index in the block table of the first block being loaded
    hashes: list[int]
    aborted: bool = False
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        connector: KvConnector | None = None,
    ) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.connector = connector
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[_Loading] = []
        self.watermark = max(1, blocks.num_blocks // 100)
        self.num_preemptions = 0
        self.cache_hit_tokens = 0
        self.cache_query_tokens = 0
        self.tier_hit_tokens = 0
        self._credit_memo: dict[str, int] = {}  # request id -> cached prefix blocks, last seen

    # -- membership ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    @property
    def num_queued(self) -> int:
        """Requests waiting to start: queued, or fetching their prefix from the KV tier."""
        return len(self.waiting) + sum(1 for item in self.loading if not item.aborted)

    def queued_prefill_tokens(self) -> int:
        """Tokens still to prefill, as LoadReport.queued_prefill_tokens defines them: the rest of
        every running prefill (chunked prompts part-way through), every queued request less the
        prefix it will find cached here, and every tier fetch less the blocks being fetched."""
        bs = self.block_size
        total = sum(prefill_remainder(seq) for seq in self.running)
        total += sum(len(i.seq.tokens) - len(i.seq.block_table) * bs for i in self.loading if not i.aborted)
        memo: dict[str, int] = {}
        for seq in self.waiting:
            if seq.block_table:  # back from the tier, holding its prefix
                total += seq.num_uncomputed
                continue
            cached = self._cached_prefix_blocks(seq, self._credit_memo.get(seq.request_id))
            memo[seq.request_id] = cached
            total += len(seq.tokens) - cached * bs
        self._credit_memo = memo
        return total

    def _cached_prefix_blocks(self, seq: Sequence, known: int | None) -> int:
        """Leading blocks ``_start`` would find cached for a queued sequence. ``known`` (the
        previous answer) is kept while the cache still ends the prefix there, so a long queue
        costs two lookups per sequence per step rather than one per cached block."""
        hashes = seq.full_block_hashes(self.block_size)
        usable = self._num_usable_blocks(seq)
        cached = self.blocks.cached_prefix_len
        if (
            known is not None
            and known <= usable
            and (known == 0 or cached(hashes[known - 1 : known]))
            and (known == usable or not cached(hashes[known : known + 1]))
        ):
            return known
        return cached(hashes[:usable])

    def _num_usable_blocks(self, seq: Sequence) -> int:
        """Leading blocks a cache hit may supply: every full block but one holding the last
        token, which is always computed (it yields the next token's logits)."""
        return (len(seq.tokens) - 1) // self.block_size

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request wherever it is; its blocks are released (after an in-flight tier load)."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._release(seq)
                return self._finish(seq, FinishReason.ABORT)
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._release(seq)
                return self._finish(seq, FinishReason.ABORT)
        for item in self.loading:
            if item.seq.request_id == request_id and not item.aborted:
                # The tier may still be writing into the reserved blocks: release them only
                # when the load is done (see _poll_loads), never hand them out now.
                item.aborted = True
                return self._finish(item.seq, FinishReason.ABORT)
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Called by the engine when a running sequence hits a stop condition."""
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        self._finish(seq, reason)

    # -- the step --------------------------------------------------------------------------
    def schedule(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """This step's work, plus sequences that ended because they can never get KV memory."""
        self._poll_loads()
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        dropped: list[Sequence] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, seq.num_computed + n):
                # Queued sequences (back from a tier load) give their blocks back first, then
                # the newest running sequences are preempted, never an older one.
                for queued in self.waiting:
                    self._release(queued)
                while not self._grow(seq, seq.num_computed + n) and self.running[-1] is not seq:
                    self._preempt(self.running.pop())
                    preempted = True
                if not self._grow(seq, seq.num_computed + n):
                    if len(self.running) == 1 and not self.loading:
                        # Alone and still out of blocks: it has outgrown the whole KV cache.
                        self.running.pop(i)
                        self._release(seq)
                        dropped.append(self._finish(seq, FinishReason.LENGTH))
                        continue
                    self.running.pop(i)
                    self._preempt(seq)
                    preempted = True
                    continue
            batch.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) + len(self.loading) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if not seq.block_table:
                started = self._start(seq)
                if started is None:
                    break
                if started is False:
                    continue  # went to the KV tier; look at the next one
            n = min(seq.num_uncomputed, budget)
            if not self._has_headroom(seq, n) or not self._grow(seq, seq.num_computed + n):
                # Give the prefix back while queued (full blocks stay cached), so waiting
                # sequences never hold memory that running ones need.
                self._release(seq)
                if not self.running and not self.loading and not batch:
                    # Nothing else holds blocks, so this prompt cannot fit at all.
                    self.waiting.popleft()
                    dropped.append(self._finish(seq, FinishReason.LENGTH))
                    continue
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch, dropped

    # -- internals -------------------------------------------------------------------------
    def _start(self, seq: Sequence) -> bool | None:
        """Attach cached prefix blocks; True = ready to compute, False = loading from the tier,
        None = no memory now (the sequence stays queued)."""
        bs = self.block_size
        usable = seq.full_block_hashes(bs)[: self._num_usable_blocks(seq)]
        seq.block_table = self.blocks.acquire_cached(usable)
        seq.num_computed = len(seq.block_table) * bs
        first_time = seq.num_cached_prompt < 0
        missing = usable[len(seq.block_table) :]
        if self.connector is not None and missing and first_time:
            ids = self.blocks.allocate(len(missing))
            if ids is None:
                self._release(seq)
                return None
            first = len(seq.block_table)
            seq.block_table += ids
            seq.status = SeqStatus.LOADING_KV
            self.waiting.popleft()
            future = self.connector.load(missing, ids)
            self.loading.append(_Loading(seq, future, first, missing))
            return False
        if first_time:
            self._note_cached(seq, 0)
        return True

    def _note_cached(self, seq: Sequence, tier_blocks: int) -> None:
        seq.num_cached_prompt = min(seq.num_computed, len(seq.prompt))
        seq.num_tier_blocks = tier_blocks
        self.cache_query_tokens += len(seq.prompt)
        self.cache_hit_tokens += seq.num_cached_prompt
        self.tier_hit_tokens += tier_blocks * self.block_size

    def _poll_loads(self) -> None:
        still: list[_Loading] = []
        ready: list[Sequence] = []
        for item in self.loading:
            if not item.future.done():
                still.append(item)
                continue
            try:
                loaded = max(0, min(int(item.future.result()), len(item.hashes)))
            except Exception:  # noqa: BLE001 - a failed load is a miss; we recompute
                loaded = 0
            seq = item.seq
            if item.aborted:
                self._release(seq)
                continue
            # Seen at the step that can first use it: how long the KV kept this sequence waiting.
            seq.kv_load_s += time.monotonic() - item.started
            for j in range(loaded):
                self.blocks.register(seq.block_table[item.first_block + j], item.hashes[j])
            seq.num_computed = (item.first_block + loaded) * self.block_size
            self._note_cached(seq, loaded)
            seq.status = SeqStatus.WAITING
            ready.append(seq)
        self.loading = still
        # Loaded sequences go first: they hold blocks, and their prompt is mostly done.
        for seq in reversed(ready):
            self.waiting.appendleft(seq)

    def _has_headroom(self, seq: Sequence, num_tokens: int) -> bool:
        """Admit only if a few blocks stay free for running decodes to grow into (a watermark):
        admitting into the last free blocks would just preempt someone on the next step."""
        if not self.running:
            return True
        need = -(-(seq.num_computed + num_tokens) // self.block_size) - len(seq.block_table)
        return self.blocks.num_free - need >= self.watermark

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        ids = self.blocks.allocate(need)
        if ids is None:
            return False
        seq.block_table += ids
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    @staticmethod
    def _finish(seq: Sequence, reason: FinishReason) -> Sequence:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return seq

"""Turn one scheduled step into tensors, run the model, sample.

The runner is the only place that knows the token layout of a step (decodes first, then prefill
chunks) and how block tables become cache slots, so the scheduler can stay pure bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import tusk.kernels as K
from tusk.kernels.sampling_penalties import (
    PenaltyRows,
    TokenLogprobs,
    apply_penalties,
    mask_tokens,
    token_logprobs,
)
from tusk.worker.block_tables import DeviceBlockTables
from tusk.worker.models.llama import AttentionMetadata, LlamaModel
from tusk.worker.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = model.device
        self.eos_token_ids = tuple(eos_token_ids)
        # Block tables live on the device and change only where a sequence's blocks changed.
        self.block_tables = DeviceBlockTables(self.device)
        # Logprobs of the last step's sampled tokens, by index in its batch (rows that asked).
        self.last_logprobs: dict[int, TokenLogprobs] = {}

    def run(self, batch: list[ScheduledSeq]) -> list[int | None]:
        """The token sampled for each scheduled sequence (None where its chunk ends mid-prompt)."""
        decodes = [i for i, s in enumerate(batch) if s.num_tokens == 1]
        prefills = [i for i, s in enumerate(batch) if s.num_tokens != 1]
        order = decodes + prefills
        bs = self.block_size

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled_items: list[int] = []
        cu = [0]
        for i in order:
            item = batch[i]
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            input_ids += seq.tokens[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + item.num_tokens)
            if item.samples:
                logits_rows.append(len(input_ids) - 1)
                sampled_items.append(i)

        dev = self.device
        nd = len(decodes)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=nd,
            decode_context_lens=None,
            decode_block_tables=None,
            prefill_cu_seqlens=None,
            prefill_context_lens=None,
            prefill_block_tables=None,
        )
        rows = self.block_tables.rows_for([batch[i].seq for i in order])
        if decodes:
            meta.decode_context_lens, meta.decode_block_tables = self._tables(
                [batch[i] for i in decodes], rows[:nd]
            )
        if prefills:
            meta.prefill_context_lens, meta.prefill_block_tables = self._tables(
                [batch[i] for i in prefills], rows[nd:]
            )
            prefill_cu = [c - cu[nd] for c in cu[nd:]]
            meta.prefill_cu_seqlens = torch.tensor(prefill_cu, dtype=torch.int32, device=dev)
            meta.prefill_max_q_len = max(batch[i].num_tokens for i in prefills)

        results: list[int | None] = [None] * len(batch)
        logits = self.model.forward(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            self.kv_cache,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )
        self.last_logprobs = {}
        if sampled_items:
            items = [batch[i] for i in sampled_items]
            raw = logits
            logits = self._process_logits(logits, items)
            # the model's ops are bound to their backend once (no per-call dispatch or validation)
            tokens = self.model.ops.sample(logits, self._sampling_batch(items)).tolist()
            for i, tok in zip(sampled_items, tokens, strict=True):
                results[i] = int(tok)
            wanted = [r for r, s in enumerate(items) if s.seq.sampling.logprobs is not None]
            if wanted:
                found = token_logprobs(
                    raw,
                    wanted,
                    [int(tokens[r]) for r in wanted],
                    [items[r].seq.sampling.logprobs or 0 for r in wanted],
                )
                for r, entry in zip(wanted, found, strict=True):
                    self.last_logprobs[sampled_items[r]] = entry
        return results

    def _process_logits(self, logits: torch.Tensor, items: list[ScheduledSeq]) -> torch.Tensor:
        """min_tokens masking, then penalties (vLLM's order); a copy only when some row needs it."""
        masked = [
            (r, [*(() if s.seq.sampling.ignore_eos else self.eos_token_ids), *s.seq.sampling.stop_token_ids])
            for r, s in enumerate(items)
            if s.seq.num_outputs < s.seq.sampling.min_tokens
        ]
        penalized = [r for r, s in enumerate(items) if s.seq.sampling.has_penalties]
        if not masked and not penalized:
            return logits
        logits = logits.float().clone()
        if masked:
            mask_tokens(logits, [r for r, _ in masked], [ids for _, ids in masked])
        if penalized:
            seqs = [items[r].seq for r in penalized]
            apply_penalties(
                logits,
                PenaltyRows(
                    rows=penalized,
                    prompt_tokens=[s.prompt for s in seqs],
                    output_tokens=[s.outputs for s in seqs],
                    repetition=[s.sampling.repetition_penalty for s in seqs],
                    presence=[s.sampling.presence_penalty for s in seqs],
                    frequency=[s.sampling.frequency_penalty for s in seqs],
                ),
            )
        return logits

    def _tables(self, items: list[ScheduledSeq], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        context = [s.seq.num_computed + s.num_tokens for s in items]
        width = max(len(s.seq.block_table) for s in items)
        return (
            torch.tensor(context, dtype=torch.int32, device=self.device),
            self.block_tables.select(rows, width),
        )

    def _sampling_batch(self, items: list[ScheduledSeq]) -> K.SamplingBatch:
        params = [s.seq.sampling for s in items]
        dev = self.device
        return K.SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev),
            top_p=torch.tensor(
                [p.top_p if 0 < p.top_p <= 1 else 1.0 for p in params], dtype=torch.float32, device=dev
            ),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int32, device=dev),
            seeds=[p.seed for p in params],
            steps=[s.seq.num_outputs for s in items],
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
            if any(p.min_p > 0 for p in params)
            else None,
        )

"""Logits processing before sampling: penalties, min_tokens, and the logprobs clients asked for.

Semantics follow vLLM, so a request sent to tusk or to vLLM means the same thing:

* repetition penalty (vLLM ``vllm/model_executor/layers/utils.py::apply_penalties``, the CTRL
  paper's rule as in transformers' ``RepetitionPenaltyLogitsProcessor``): every token that appears
  in the prompt *or* the output has its logit divided by the penalty when positive, multiplied by
  it when negative;
* presence and frequency penalties (OpenAI's definition, as vLLM applies them): on *output*
  tokens only, ``logit -= frequency * count + presence * (count > 0)``;
* min_tokens (vLLM's ``MinTokensLogitsProcessor``): until a sequence has that many outputs, its
  stop tokens (EOS unless ``ignore_eos``, and ``stop_token_ids``) get logit -inf;
* logprobs (vLLM's default ``logprobs_mode="raw_logprobs"``): log-softmax of the model's raw
  logits, before any of the above, temperature or filters.

vLLM applies min_tokens, then penalties, then greedy/temperature/min-p/top-k/top-p; the model
runner keeps that order. Rows that use none of this cost nothing: callers pass only the rows
that need processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PenaltyRows:
    """Which rows of a logits batch get penalties, and their token histories."""

    rows: list[int]
    prompt_tokens: list[list[int]]
    output_tokens: list[list[int]]
    repetition: list[float]
    presence: list[float]
    frequency: list[float]


def _bin_counts(tokens: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] occurrence counts; padding lands in an extra column that is dropped."""
    width = max((len(t) for t in tokens), default=0)
    padded = torch.full((len(tokens), max(width, 1)), vocab, dtype=torch.int64)
    for i, row in enumerate(tokens):
        if row:
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros((len(tokens), vocab + 1), dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, spec: PenaltyRows) -> None:
    """Apply repetition, presence and frequency penalties to ``logits`` rows in place (fp32)."""
    if not spec.rows:
        return
    vocab = logits.shape[1]
    device = logits.device
    index = torch.tensor(spec.rows, dtype=torch.int64, device=device)
    rows = logits.index_select(0, index)
    output_counts = _bin_counts(spec.output_tokens, vocab, device)
    output_mask = output_counts > 0
    prompt_mask = _bin_counts(spec.prompt_tokens, vocab, device) > 0
    repetition = torch.tensor(spec.repetition, dtype=rows.dtype, device=device)[:, None]
    penalties = torch.where(prompt_mask | output_mask, repetition, torch.ones_like(rows))
    rows = torch.where(rows > 0, rows / penalties, rows * penalties)
    frequency = torch.tensor(spec.frequency, dtype=rows.dtype, device=device)[:, None]
    presence = torch.tensor(spec.presence, dtype=rows.dtype, device=device)[:, None]
    rows = rows - frequency * output_counts.to(rows.dtype) - presence * output_mask.to(rows.dtype)
    logits.index_copy_(0, index, rows)


def mask_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> None:
    """Set ``logits[row, token] = -inf`` for each row's tokens (min_tokens: no stop token yet)."""
    vocab = logits.shape[1]
    pairs = [(r, t) for r, ids in zip(rows, token_ids, strict=True) for t in ids if 0 <= t < vocab]
    if not pairs:
        return
    r, t = zip(*pairs, strict=True)
    logits[list(r), list(t)] = float("-inf")


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the ``len(top_ids)`` most likely tokens'."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def token_logprobs(
    raw_logits: torch.Tensor, rows: list[int], tokens: list[int], top_n: list[int]
) -> list[TokenLogprobs]:
    """Log-softmax of each listed row's raw logits at its sampled token, plus its top ``n``."""
    if not rows:
        return []
    index = torch.tensor(rows, dtype=torch.int64, device=raw_logits.device)
    logprobs = torch.log_softmax(raw_logits.index_select(0, index).float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None]).flatten().tolist()
    k = max(top_n)
    if k > 0:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    out = []
    for i, n in enumerate(top_n):
        if n > 0:
            out.append(TokenLogprobs(chosen[i], top_ids_list[i][:n], top_values_list[i][:n]))
        else:
            out.append(TokenLogprobs(chosen[i], [], []))
    return out

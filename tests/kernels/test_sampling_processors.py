"""min-p, top-k, top-p and the penalties against transformers' own logits processors on the same
logits: a seeded row must draw exactly the token that the inverse CDF over transformers'
filtered distribution gives for the row's uniform number."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from tusk.kernels.sampling_core import row_uniform
from tusk.kernels.sampling_penalties import PenaltyRows, apply_penalties, mask_tokens, token_logprobs

from tusk import kernels as K

ROWS, VOCAB = 24, 400


def _batch(temperature: float, top_k=0, top_p=1.0, min_p=None) -> K.SamplingBatch:
    return K.SamplingBatch(
        temperature=torch.full((ROWS,), temperature),
        top_p=torch.full((ROWS,), top_p),
        top_k=torch.full((ROWS,), top_k, dtype=torch.int32),
        seeds=list(range(100, 100 + ROWS)),
        steps=[3] * ROWS,
        min_p=None if min_p is None else torch.full((ROWS,), min_p),
    )


def _expected(logits: torch.Tensor, batch: K.SamplingBatch, warpers) -> list[int]:
    """Inverse CDF, in vocabulary order, over the distribution transformers' warpers leave."""
    scores = logits / batch.temperature[:, None]
    for warper in warpers:
        scores = warper(None, scores)
    probs = torch.softmax(scores, dim=-1).double()
    out = []
    for row in range(ROWS):
        cdf = torch.cumsum(probs[row], dim=0)
        target = torch.tensor([row_uniform(batch, row) * float(cdf[-1])], dtype=cdf.dtype)
        out.append(min(int(torch.searchsorted(cdf, target, right=True)), VOCAB - 1))
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "knobs, warpers",
    [
        (dict(top_k=7), [TopKLogitsWarper(7)]),
        (dict(min_p=0.2), [MinPLogitsWarper(0.2)]),
        (dict(top_p=0.8), [TopPLogitsWarper(0.8)]),
        # vLLM's order: min-p first, then top-k and top-p
        (dict(min_p=0.05, top_p=0.7), [MinPLogitsWarper(0.05), TopPLogitsWarper(0.7)]),
        (dict(min_p=0.3, top_k=50), [MinPLogitsWarper(0.3), TopKLogitsWarper(50)]),
    ],
)
def test_filters_match_transformers_warpers(backend, knobs, warpers) -> None:
    logits = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    batch = _batch(0.7, **knobs)
    K.force_backend(backend)
    try:
        got = K.sample(logits, batch).tolist()
    finally:
        K.force_backend(None)
    assert got == _expected(logits, batch, warpers)


def test_min_p_leaves_greedy_alone() -> None:
    logits = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(8))
    assert K.sample(logits, _batch(0.0, min_p=0.9)).tolist() == logits.argmax(-1).tolist()


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, VOCAB, generator=gen) * 4
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 30, 1, 12)]
    outputs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (0, 9, 4, 20)]
    ours = logits.clone()
    apply_penalties(ours, PenaltyRows([0, 1, 2, 3], prompts, outputs, [1.3] * 4, [0.0] * 4, [0.0] * 4))
    for row in range(4):
        ids = torch.tensor([prompts[row] + outputs[row]])
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], theirs, rtol=0, atol=0)


def test_presence_and_frequency_follow_openai_on_output_tokens_only() -> None:
    logits = torch.zeros(2, 10)
    apply_penalties(
        logits,
        PenaltyRows(
            [1],
            prompt_tokens=[[4, 4, 5]],
            output_tokens=[[3, 3, 3, 7]],
            repetition=[1.0],
            presence=[0.5],
            frequency=[0.25],
        ),
    )
    expected = torch.zeros(2, 10)
    expected[1, 3] = -(3 * 0.25 + 0.5)
    expected[1, 7] = -(1 * 0.25 + 0.5)
    assert torch.equal(logits, expected)  # row 0 untouched, prompt tokens 4 and 5 untouched


def test_mask_tokens_and_raw_logprobs() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(10))
    masked = logits.clone()
    mask_tokens(masked, [0, 2], [[1, 2], [5]])
    assert masked[0, 1] == masked[0, 2] == masked[2, 5] == float("-inf")
    assert torch.equal(masked[1], logits[1])
    entries = token_logprobs(logits, [0, 2], [4, 6], [3, 0])
    reference = torch.log_softmax(logits, dim=-1)
    assert entries[0].logprob == pytest.approx(float(reference[0, 4]), abs=1e-6)
    assert entries[0].top_ids == torch.topk(reference[0], 3).indices.tolist()
    assert entries[1].top_ids == [] and entries[1].logprob == pytest.approx(float(reference[2, 6]), abs=1e-6)


def test_batch_uniforms_match_per_row_draws_without_generators() -> None:
    from tusk.kernels.sampling_core import batch_uniforms, seeded_uniform

    batch = K.SamplingBatch(
        temperature=torch.ones(4),
        top_p=torch.ones(4),
        top_k=torch.zeros(4, dtype=torch.int32),
        seeds=[7, None, 2**64 - 1, None],
        steps=[0, 0, 9, 3],
    )
    K.reseed_process_generator(5)
    first = batch_uniforms(batch, [0, 1, 2, 3])
    K.reseed_process_generator(5)
    assert batch_uniforms(batch, [0, 1, 2, 3]) == first  # unseeded rows: reproducible per process seed
    assert first[0] == row_uniform(batch, 0) == seeded_uniform(7, 0)
    assert first[2] == row_uniform(batch, 2)
    values = {seeded_uniform(s, t) for s in range(50) for t in range(50)}
    assert len(values) == 2500 and all(0.0 <= v < 1.0 for v in values)

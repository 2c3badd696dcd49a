"""The engine's request-level sampling options, end to end through a real model, against
transformers' generate on the same checkpoint: repetition penalty, min_tokens, presence and
frequency penalties (vLLM/OpenAI semantics), raw logprobs, and refusal of non-finite values."""

from __future__ import annotations

import math

import pytest
import torch
from tusk.worker.engine import InvalidRequest, LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import _hf_model, run_all

from tusk.config import EngineConfig

PROMPTS = [[1, 17, 33, 40, 17, 91, 5], [1, 200, 201, 3, 3, 3, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def engine(llama_dir):
    return LLMEngine(llama_dir, EngineConfig(num_kv_blocks=128, block_size=4))


def _hf(folder, prompt, new_tokens, **kwargs):
    model = _hf_model(folder)
    ids = torch.tensor([prompt])
    kwargs.setdefault("eos_token_id", None)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out


class _OpenAIPenalties:
    """Presence/frequency penalties on generated tokens only, as OpenAI defines them."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            counts = torch.bincount(input_ids[row, self.prompt_len :], minlength=scores.shape[1])
            scores[row] -= self.frequency * counts + self.presence * (counts > 0)
        return scores


def test_repetition_penalty_matches_transformers_and_only_its_row(engine, llama_dir) -> None:
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    penalized = SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.8)
    got = engine.generate(PROMPTS, [penalized, plain])
    expected = _hf(llama_dir, PROMPTS[0], 12, repetition_penalty=1.8)[0, len(PROMPTS[0]) :].tolist()
    assert got[0] == expected
    assert got[1] == _hf(llama_dir, PROMPTS[1], 12)[0, len(PROMPTS[1]) :].tolist()
    assert got[0] != engine.generate([PROMPTS[0]], plain)[0]  # the penalty changed something


def test_presence_and_frequency_penalties_match_a_reference(engine, llama_dir) -> None:
    from transformers import LogitsProcessorList

    sp = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7)
    (got,) = engine.generate([PROMPTS[1]], sp)
    reference = LogitsProcessorList([_OpenAIPenalties(len(PROMPTS[1]), 1.5, 0.7)])
    expected = _hf(llama_dir, PROMPTS[1], 12, logits_processor=reference)[0, len(PROMPTS[1]) :].tolist()
    assert got == expected


def test_min_tokens_masks_stop_tokens_like_transformers(engine, llama_dir) -> None:
    (greedy,) = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True))
    stop = greedy[0]  # greedy would stop at once on this token
    sp = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(stop,), min_tokens=4)
    (got,) = engine.generate([PROMPTS[0]], sp)
    assert stop not in got[:4] and len(got) >= 4
    out = _hf(llama_dir, PROMPTS[0], 10, eos_token_id=stop, min_new_tokens=4)
    assert got == out[0, len(PROMPTS[0]) :].tolist()


def test_logprobs_are_raw_log_softmax_of_each_step(engine, llama_dir) -> None:
    engine.add_request("lp", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3))
    outs = run_all(engine)["lp"]
    tokens = [t for o in outs for t in o.new_token_ids]
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert len(entries) == len(tokens) == 5
    hf = _hf(llama_dir, PROMPTS[0], 5, output_logits=True, return_dict_in_generate=True)
    for step, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        reference = torch.log_softmax(hf.logits[step][0].float(), dim=-1)
        assert entry.logprob == pytest.approx(float(reference[token]), abs=1e-4)
        assert entry.top_ids == torch.topk(reference, 3).indices.tolist()
        assert entry.top_ids[0] == token  # greedy picks the most likely token


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=math.nan),
        dict(top_p=math.nan),
        dict(temperature=math.inf),
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=3.0),
        dict(min_tokens=9, max_tokens=4),
        dict(logprobs=21),
    ],
)
def test_bad_sampling_values_are_refused(engine, params) -> None:
    with pytest.raises(InvalidRequest):
        engine.add_request("bad", [1, 2, 3], SamplingParams(**{"max_tokens": 4, **params}))


def test_token_budget_below_the_sequence_cap_is_a_config_error() -> None:
    import pydantic

    with pytest.raises(
        pydantic.ValidationError, match="max_num_batched_tokens \\(8\\) must be >= max_num_seqs"
    ):
        EngineConfig(max_num_batched_tokens=8, max_num_seqs=16)
    assert EngineConfig(max_num_batched_tokens=16, max_num_seqs=16).max_num_seqs == 16

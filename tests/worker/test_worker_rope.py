"""Rope types beyond the default: the tables against transformers' own rope initialisers, greedy
output against transformers, and one-line errors for types tusk does not reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tusk.worker import loader
from tusk.worker.engine import LLMEngine
from tusk.worker.models.rope import cos_sin_cache
from tusk.worker.sequence import SamplingParams
from worker_models import hf_greedy, make_config, save_model

from tusk.config import EngineConfig

PROMPT = [(i * 7 + 3) % 250 + 3 for i in range(23)]
HEAD_DIM = 16
ROPES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": 32,
        "short_factor": [1.0 + i / 10 for i in range(HEAD_DIM // 2)],
        "long_factor": [2.0 + i / 3 for i in range(HEAD_DIM // 2)],
    },
}


def _hf_row(config, position: int) -> torch.Tensor:
    """transformers' cos/sin at ``position`` for a sequence of position + 1 tokens."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](
        config, "cpu", seq_len=position + 1
    )
    freqs = position * inv_freq.float()
    return torch.cat([freqs.cos() * factor, freqs.sin() * factor])


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_tables_match_transformers_rope_init(kind: str) -> None:
    params = {**ROPES[kind], "rope_theta": 10000.0}
    config = make_config("llama", rope_parameters=params, max_position_embeddings=128, head_dim=HEAD_DIM)
    spec = loader.ModelSpec.from_config(json.loads(config.to_json_string()))
    assert spec.rope_scaling["rope_type"] == kind
    positions = 3 * 128
    table = cos_sin_cache(spec.rope_scaling, spec.rope_theta, HEAD_DIM, 128, positions, "cpu")
    for p in (0, 1, 31, 32, 33, 127, 128, 129, 200, positions - 1):
        torch.testing.assert_close(table[p], _hf_row(config, p), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_greedy_matches_transformers(kind: str, tmp_path: Path) -> None:
    params = {**ROPES[kind], "rope_theta": 10000.0}
    folder = save_model(tmp_path / kind, "llama", seed=5, rope_parameters=params, head_dim=HEAD_DIM)
    eng = LLMEngine(folder, EngineConfig(num_kv_blocks=32, block_size=8))
    assert eng.spec.rope_scaling["rope_type"] == kind
    assert eng.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True)) == [
        hf_greedy(folder, PROMPT, 8)
    ]
    if kind == "dynamic":  # NTK scaling extends the context by its factor
        assert eng.max_model_len == 512 * 3


def test_legacy_rope_scaling_dialect_and_unsupported_types() -> None:
    base = json.loads(make_config("llama").to_json_string())
    base.pop("rope_parameters", None)
    legacy = {**base, "rope_theta": 20000.0, "rope_scaling": {"type": "yarn", "factor": 2.0}}
    spec = loader.ModelSpec.from_config(legacy)
    assert spec.rope_theta == 20000.0 and spec.rope_scaling["rope_type"] == "yarn"

    for scaling, message in (
        ({"rope_type": "mrope", "mrope_section": [2, 2]}, "rope type 'mrope' is not supported"),
        ({"rope_type": "longrope", "long_factor": [1.0]}, "needs short_factor"),
        ({"rope_type": "linear"}, "needs factor"),
    ):
        with pytest.raises(loader.ModelLoadError, match=message) as err:
            loader.ModelSpec.from_config({**base, "rope_scaling": scaling})
        assert "\n" not in str(err.value)

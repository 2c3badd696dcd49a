"""Qwen3, Gemma 2 and 3, Phi-3, Mixtral and Qwen3-MoE: each greedy-identical to transformers on a small
random model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import hf_greedy, save_model

from tusk.config import EngineConfig

PROMPT = [(i * 11 + 7) % 250 + 3 for i in range(21)]


def check(folder: Path, n: int = 10, **engine: object) -> LLMEngine:
    eng = LLMEngine(folder, EngineConfig(num_kv_blocks=32, block_size=4, **engine))
    expected = hf_greedy(folder, PROMPT, n)
    assert eng.generate([PROMPT], SamplingParams(max_tokens=n, ignore_eos=True)) == [expected]
    # Chunked prefill and a batch of two reach the same tokens.
    chunked = LLMEngine(
        folder,
        EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=6, max_num_seqs=6, **engine),
    )
    other = PROMPT[5:]
    both = chunked.generate([PROMPT, other], SamplingParams(max_tokens=n, ignore_eos=True))
    assert both == [expected, hf_greedy(folder, other, n)]
    return eng


def test_qwen3_qk_norm_and_attention_bias(tmp_path: Path) -> None:
    eng = check(save_model(tmp_path / "qwen3", "qwen3", seed=21, attention_bias=True))
    assert eng.spec.qk_norm and eng.spec.o_bias and eng.spec.head_dim == 32


def test_gemma3_alternating_sliding_window(tmp_path: Path) -> None:
    """(1 + w) norms around attention and MLP, scaled embeddings, gelu-tanh, q/k norms,
    query_pre_attn_scalar, sliding layers (window 8 < prompt) with their own rope base."""
    # Untied: with Gemma's scaled, tied embeddings the argmax barely depends on the layers.
    folder = save_model(
        tmp_path / "gemma3", "gemma3", seed=22, num_hidden_layers=4, tie_word_embeddings=False
    )
    eng = check(folder)
    assert eng.spec.layer_windows == (8, None, 8, None) and eng.spec.local_rope_theta == 10.0


def test_gemma2_soft_capped_attention_and_logits(tmp_path: Path) -> None:
    """Attention scores capped at 2 (small, so the cap changes scores), final logits at 3, and the
    alternating window of 8 under a 21-token prompt."""
    folder = save_model(
        tmp_path / "gemma2",
        "gemma2",
        seed=27,
        final_logit_softcapping=3.0,
        num_hidden_layers=4,
        tie_word_embeddings=False,
    )
    eng = check(folder)
    assert eng.spec.attn_logit_softcapping == 2.0 and eng.spec.layer_windows == (8, None, 8, None)
    assert eng.spec.local_rope_theta is None


def test_gemma3_final_logit_softcapping(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "gemma3-cap", "gemma3", seed=23, final_logit_softcapping=3.0)
    assert check(folder, n=6).spec.final_logit_softcapping == 3.0


@pytest.mark.parametrize("longrope", [False, True])
def test_phi3_fused_weights(longrope: bool, tmp_path: Path) -> None:
    rope = {}
    if longrope:  # a prompt past original_max_position_embeddings uses the long factors
        rope = {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + i / 8 for i in range(8)],
                "long_factor": [1.5 + i / 4 for i in range(8)],
            },
            "original_max_position_embeddings": 16,
        }
    folder = save_model(tmp_path / "phi3", "phi3", seed=24, **rope)
    eng = LLMEngine(folder, EngineConfig(num_kv_blocks=32, block_size=4))
    assert eng.spec.family == "phi3"
    prompt = PROMPT[:12] if longrope else PROMPT  # longrope: short factors throughout, as in transformers
    expected = hf_greedy(folder, prompt, 4 if longrope else 10)
    assert eng.generate([prompt], SamplingParams(max_tokens=len(expected), ignore_eos=True)) == [expected]


def test_mixtral_experts(tmp_path: Path) -> None:
    eng = check(save_model(tmp_path / "mixtral", "mixtral", seed=25, sliding_window=8))
    assert eng.spec.num_experts == 4 and eng.spec.moe_renormalize and eng.spec.layer_windows == (8, 8)


def test_qwen3_moe_with_a_dense_layer(tmp_path: Path) -> None:
    """norm_topk_prob off (Qwen3-MoE's default) and layer 1 a dense MLP (mlp_only_layers)."""
    folder = save_model(tmp_path / "qwen3moe", "qwen3_moe", seed=26, num_hidden_layers=3, mlp_only_layers=[1])
    eng = check(folder)
    assert eng.spec.moe_layers == (True, False, True) and not eng.spec.moe_renormalize


def test_missing_expert_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from tusk.worker.loader import ModelLoadError

    folder = save_model(tmp_path / "mixtral", "mixtral", seed=28)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        ModelLoadError, match=r"lacks tensors MixtralForCausalLM needs: .*experts\.2\.w3\.weight$"
    ):
        LLMEngine(folder, EngineConfig(num_kv_blocks=4))

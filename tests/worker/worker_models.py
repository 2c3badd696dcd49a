"""Tiny random checkpoints of each supported architecture, saved the way Hugging Face saves them."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2")


def make_config(arch: str, **overrides):
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(arch)


def save_model(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A random model of ``arch`` in ``folder``; returns the folder."""
    import transformers

    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # random biases, so the qkv bias path matters
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy continuation from transformers (no EOS stopping)."""
    import transformers

    model = _hf_model(folder)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    del transformers
    return out[0, len(prompt) :].tolist()


_CACHE: dict[str, object] = {}


def _hf_model(folder: Path):
    import transformers

    key = str(folder)
    if key not in _CACHE:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        _CACHE[key] = model
    return _CACHE[key]


def run_all(engine) -> dict[str, list]:
    """Step an engine until idle; returns every request's outputs by request id."""
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs

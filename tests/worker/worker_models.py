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
        return transformers.MistralConfig(**{"sliding_window": None, **common})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**{"head_dim": 32, **common})
    if arch == "phi3":
        return transformers.Phi3Config(**common)
    if arch == "mixtral":
        return transformers.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    if arch == "qwen3_moe":
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}
        return transformers.Qwen3MoeConfig(**{**moe, **common})
    if arch == "gemma2":
        layer_types = ["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2)
        gemma2 = {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": layer_types,
            "query_pre_attn_scalar": 1,  # scale 1: scores large enough for the cap to bite
        }
        return transformers.Gemma2Config(**{**gemma2, "attn_logit_softcapping": 2.0, **common})
    if arch == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2)
        return transformers.Gemma3TextConfig(
            **{
                "head_dim": 16,
                "sliding_window": 8,
                "layer_types": layer_types,
                "query_pre_attn_scalar": 24,
                # Bases far apart, so a layer rotated with the other one's base changes the output.
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                },
                **common,
            }
        )
    raise ValueError(arch)


def save_model(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A random model of ``arch`` in ``folder``; returns the folder."""
    import transformers

    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases and norm weights (HF starts them at 0 or 1), so they matter
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ("norm" in name and arch not in ARCHS):
                param.add_(torch.randn_like(param) * 0.3)
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


def _llama_cpp_permute(weights, heads: int):
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute``: rotate-half pairs -> interleaved rows."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_tokenizer_metadata(writer) -> int:
    """A small byte-level BPE vocabulary (256 byte tokens, a few merges, ChatML control tokens);
    returns its size."""
    from tusk.tiny_model import byte_to_unicode

    letters = byte_to_unicode()
    tokens = [letters[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n"]
    tokens += ["Ġt", "he", "Ġthe", "in"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + specials)
    writer.add_token_types([1] * len(tokens) + [3] * len(specials))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) + 1)
    writer.add_eos_token_id(len(tokens) + 2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return len(tokens) + len(specials)


def save_gguf(
    path: Path, folder: Path, qtype: str = "F32", extra: dict | None = None, arch: str = "llama"
) -> Path:
    """Write the HF checkpoint in ``folder`` (a Llama, Qwen2 or Qwen3) as llama.cpp would: its tensor
    names, Llama's Q/K rows permuted, 2-D weights in ``qtype`` (norms stay F32); ``extra`` adds raw
    tensors by GGUF name."""
    import json

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:  # as llama.cpp's converter writes it
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = gguf_tokenizer_metadata(writer)
    assert vocab == config["vocab_size"], "make the model with vocab_size=263"
    qtype_enum = gguf.GGMLQuantizationType[qtype]
    for name, tensor in load_file(folder / "model.safetensors").items():
        base, _, suffix = name.rpartition(".")
        if base.startswith("model.layers."):
            _, _, index, rest = base.split(".", 3)
            gguf_name = f"blk.{index}.{GGUF_NAMES[rest]}.{suffix}"
        else:
            gguf_name = f"{GGUF_NAMES[base]}.{suffix}"
        data = tensor.float().numpy()
        if arch != "llama":
            pass
        elif ".self_attn.q_proj." in name:
            data = _llama_cpp_permute(data, heads)
        elif ".self_attn.k_proj." in name:
            data = _llama_cpp_permute(data, kv_heads)
        if data.ndim == 2 and qtype != "F32":
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype_enum), raw_dtype=qtype_enum)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    for gguf_name, (array, raw_dtype) in (extra or {}).items():
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

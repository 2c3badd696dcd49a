"""Load a Hugging Face checkpoint folder into plain tensors, without transformers.

Workers must start fast and with few dependencies, so the config is read as JSON and the weights
come straight from safetensors. Both config dialects are accepted: the classic one
(``rope_theta`` / ``rope_scaling`` / ``torch_dtype``) and the transformers 5 one
(``rope_parameters`` / ``dtype``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tusk.worker import gguf_model
from tusk.worker.models.rope import RopeError, check_rope, rope_type

from tusk.model_source import HUB_FILE_PATTERNS, SUPPORTED_ARCHITECTURES

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ModelLoadError(ValueError):
    """The model folder cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the engine needs, normalised across config dialects and families."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    checkpoint_dtype: str
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None  # the window of the layers that have one
    family: str = "llama"
    o_bias: bool = False  # Llama/Qwen3/Gemma3 with attention_bias also bias o_proj
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down
    qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over each head of q and k before rope
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, or None (full)
    local_rope_theta: float | None = None  # Gemma3: sliding layers use default rope with this base
    hidden_act: str = "silu"
    gemma: bool = False  # (1 + w) norms, scaled embeddings, norms around attention and MLP outputs
    attention_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh-capped attention scores
    num_experts: int = 0  # mixture of experts (Mixtral, Qwen3-MoE): experts per MoE layer
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_renormalize: bool = True  # top-k routing weights renormalised to sum to 1
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or a dense MLP
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def context_limit(self) -> int:
        """The longest sequence the model is served for: dynamic NTK rope extends the trained length
        by its factor, every other type stops at ``max_position_embeddings``."""
        if rope_type(self.rope_scaling) == "dynamic":
            return int(self.max_position_embeddings * float(self.rope_scaling["factor"]))  # type: ignore[index]
        return self.max_position_embeddings

    @classmethod
    def from_config(
        cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelSpec:
        archs = config.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = config.get("model_type")
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(model_type) if not archs else None
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or config.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        gemma = family in ("gemma2", "gemma3")
        act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS[family]:
            raise ModelLoadError(
                f"unsupported hidden_act {act!r} for {arch}; supported: {_ACTIVATIONS[family]}"
            )
        softcap = config.get("attn_logit_softcapping")
        if softcap is not None and family != "gemma2":
            raise ModelLoadError(f"attn_logit_softcapping is not supported for {arch}")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
        theta, scaling, local_theta = _rope(config, family == "gemma3")
        if family == "phi3" and scaling and rope_type(scaling) in ("su", "yarn"):
            scaling["rope_type"] = "longrope"  # Phi-3's configs call LongRoPE "su" or "yarn"
        try:
            check_rope(scaling, head_dim)
        except RopeError as exc:
            raise ModelLoadError(str(exc)) from None
        windows = _layer_windows(config, family, layers)
        experts = (
            int(config.get("num_local_experts") or config.get("num_experts") or 0) if family in _MOE else 0
        )
        if family == "qwen3_moe":
            dense = set(config.get("mlp_only_layers") or [])
            step = int(config.get("decoder_sparse_step") or 1)
            moe_layers = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))
        else:
            moe_layers = (experts > 0,) * layers
        attention_bias = bool(config.get("attention_bias", False))
        scalar = config.get("query_pre_attn_scalar") if gemma else None
        return cls(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            qkv_bias=family == "qwen2" or (attention_bias and family in _ATTENTION_BIAS_FAMILIES),
            checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            eos_token_ids=_eos_ids(config, generation_config),
            sliding_window=next((w for w in windows if w), None),
            family=family,
            o_bias=attention_bias and family in _ATTENTION_BIAS_FAMILIES,
            mlp_bias=bool(config.get("mlp_bias", False)) and family == "llama",
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            layer_windows=windows,
            local_rope_theta=local_theta,
            hidden_act=act,
            gemma=gemma,
            attention_scale=float(scalar) ** -0.5 if scalar else None,
            final_logit_softcapping=config.get("final_logit_softcapping") if gemma else None,
            attn_logit_softcapping=float(softcap) if softcap is not None else None,
            num_experts=experts,
            experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
            moe_renormalize=family == "mixtral" or bool(config.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            raw=config,
        )


# Families whose attention_bias puts a bias on q, k, v and o (Mistral and Phi-3 have none; Qwen2
# always biases q, k and v only).
_ATTENTION_BIAS_FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma2", "gemma3")
_MOE = ("mixtral", "qwen3_moe")
_ACTIVATIONS = {
    "llama": ("silu",),
    "mistral": ("silu",),
    "qwen2": ("silu",),
    "qwen3": ("silu",),
    "phi3": ("silu",),
    "mixtral": ("silu",),
    "qwen3_moe": ("silu",),
    "gemma2": ("gelu_pytorch_tanh",),
    "gemma3": ("gelu_pytorch_tanh",),
}


def _rope(config: dict[str, Any], gemma3: bool) -> tuple[float, dict[str, Any] | None, float | None]:
    """(theta, scaling or None for plain rope, Gemma's local theta) from either config dialect:
    transformers 5's ``rope_parameters`` (per layer type for Gemma 3) or ``rope_theta`` +
    ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or {})
    local_theta = None
    if gemma3:
        local = params.pop("sliding_attention", None)
        params = dict(params.pop("full_attention", None) or params)
        if local is not None and rope_type(local) != "default":
            raise ModelLoadError(f"Gemma 3 sliding layers with rope {rope_type(local)!r} are not supported")
        local_theta = float((local or {}).get("rope_theta") or config.get("rope_local_base_freq") or 10000.0)
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    scaling = dict(params or config.get("rope_scaling") or {})
    if scaling:
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        scaling.pop("rope_theta", None)
        if scaling["rope_type"] == "default" and float(scaling.get("partial_rotary_factor", 1.0)) == 1.0:
            scaling = {}
    if scaling and "original_max_position_embeddings" not in scaling:
        original = config.get("original_max_position_embeddings")
        if original:
            scaling["original_max_position_embeddings"] = original
    return theta, scaling or None, local_theta


def _layer_windows(config: dict[str, Any], family: str, layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window: from ``layer_types`` when the config lists them (transformers 5
    writes it), else by each family's older rule."""
    window = config.get("sliding_window")
    if not window:
        return (None,) * layers
    types = config.get("layer_types")
    if not types:
        if family in ("qwen2", "qwen3", "qwen3_moe"):
            start = config.get("max_window_layers", layers) if config.get("use_sliding_window") else layers
            types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
        elif family in ("gemma2", "gemma3"):
            pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        else:  # Mistral, Mixtral, Phi-3, Llama: every layer
            types = ["sliding_attention"] * layers
    if len(types) != layers:
        raise ModelLoadError(f"config layer_types has {len(types)} entries for {layers} layers")
    unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise ModelLoadError(f"unsupported layer_types {unknown}")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _eos_ids(config: dict[str, Any], generation_config: dict[str, Any] | None) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation_config or {}, config):
        eos = source.get("eos_token_id")
        for tok in eos if isinstance(eos, list) else [eos]:
            if isinstance(tok, int) and tok not in ids:
                ids.append(tok)
    return tuple(ids)


def resolve_model_path(model: str) -> Path:
    """A local folder for ``model``: the folder itself, ``tiny`` (the embedded default model), an
    ``hf://org/name[@revision]`` snapshot, or the prepared folder of a ``.gguf`` file."""
    if gguf_model.is_gguf(model):
        try:
            return gguf_model.prepared_folder(model)
        except gguf_model.GGUFError as exc:
            raise ModelLoadError(str(exc)) from None
    if model == "tiny":
        from tusk.tiny_model import tiny_model_dir

        return tiny_model_dir()
    if model.startswith("hf://"):
        repo, _, revision = model[len("hf://") :].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelLoadError(f"hf:// model ids look like hf://org/name[@revision], got {model!r}")
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise ModelLoadError(
                f"{model!r} needs the huggingface_hub package (pip install huggingface_hub), "
                "or download the model and pass its local folder"
            ) from exc
        try:
            path = snapshot_download(
                repo,
                revision=revision or None,
                allow_patterns=HUB_FILE_PATTERNS,
            )
        except Exception as exc:  # noqa: BLE001 - any hub failure is a load error with context
            raise ModelLoadError(f"could not download {model!r} from the Hugging Face Hub: {exc}") from exc
        return Path(path)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder {model!r} does not exist (expected a local folder or hf://org/name)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json")
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_spec(folder: Path) -> ModelSpec:
    config = read_json(folder / "config.json")
    if config is None:
        raise ModelLoadError(f"model folder {str(folder)!r} has no config.json")
    try:
        return ModelSpec.from_config(config, read_json(folder / "generation_config.json"))
    except KeyError as exc:
        raise ModelLoadError(f"config.json in {str(folder)!r} lacks required field {exc}") from exc


def choose_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """``auto`` keeps the checkpoint's dtype, except half types on CPU, where float32 is faster and exact."""
    if requested != "auto":
        return _DTYPES[requested]
    dtype = _DTYPES.get(spec.checkpoint_dtype, torch.float32)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def weight_files(folder: Path) -> list[Path]:
    gguf_file = gguf_model.gguf_in(folder)
    if gguf_file is not None:
        return [gguf_file]
    index = read_json(folder / "model.safetensors.index.json")
    if index is not None:
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in model.safetensors.index.json are missing: {missing}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model folder {str(folder)!r} has no *.safetensors weights")
    return files


def load_weights(folder: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, converted to ``dtype`` on ``device``."""
    from safetensors import safe_open

    gguf_file = gguf_model.gguf_in(folder)
    if gguf_file is not None:
        try:
            return gguf_model.load_gguf_weights(
                gguf_file, read_json(folder / "config.json") or {}, dtype, device
            )
        except gguf_model.GGUFError as exc:
            raise ModelLoadError(str(exc)) from None
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return tensors


def model_digest(folder: Path) -> str:
    """The model identity in KV-tier keys: config plus the SHA-256 of every weight byte (see
    ``tusk.worker.fingerprint`` for how the hashes are cached)."""
    from tusk.worker.fingerprint import model_identity

    return model_identity(folder, weight_files(folder))

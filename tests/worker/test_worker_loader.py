"""Checkpoint loading: config dialects, sharding, tied embeddings, rope scaling, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tusk.worker import loader
from tusk.worker.block_manager import BlockManager
from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams
from worker_models import hf_greedy, save_model

from tusk.config import EngineConfig

PROMPT = [(i * 13 + 5) % 250 + 3 for i in range(19)]


def check_matches_transformers(folder: Path, n: int = 10, **engine: object) -> LLMEngine:
    eng = LLMEngine(folder, EngineConfig(num_kv_blocks=32, block_size=8, **engine))
    assert eng.generate([PROMPT], SamplingParams(max_tokens=n, ignore_eos=True)) == [
        hf_greedy(folder, PROMPT, n)
    ]
    return eng


def test_sharded_checkpoint_with_tied_embeddings(tmp_path: Path) -> None:
    import torch
    import transformers
    from worker_models import make_config

    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(
        make_config("llama", tie_word_embeddings=True, num_hidden_layers=3), dtype=torch.float32
    )
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    eng = check_matches_transformers(tmp_path)
    assert eng.spec.tie_word_embeddings and eng.model.lm_head is eng.model.embed


def test_llama3_rope_scaling_and_llama1_style_config(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    folder = save_model(tmp_path / "l3", "llama", seed=4, rope_parameters=scaling)
    eng = check_matches_transformers(folder, n=6)
    assert eng.spec.rope_scaling and eng.spec.rope_scaling["rope_type"] == "llama3"
    assert eng.spec.rope_theta == 500000.0

    # The classic dialect (rope_theta / rope_scaling / no num_key_value_heads, as Llama 1 had)
    # parses to the same spec.
    classic = json.loads((folder / "config.json").read_text())
    params = classic.pop("rope_parameters")
    classic["rope_theta"] = params.pop("rope_theta")
    classic["rope_scaling"] = params
    classic["torch_dtype"] = "bfloat16"
    spec = loader.ModelSpec.from_config(classic)
    assert spec.rope_scaling == eng.spec.rope_scaling and spec.rope_theta == 500000.0
    del classic["num_key_value_heads"]
    assert loader.ModelSpec.from_config(classic).num_kv_heads == classic["num_attention_heads"]


def test_dtype_selection() -> None:
    import torch

    spec = loader.ModelSpec.from_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "torch_dtype": "bfloat16",
        }
    )
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader.choose_dtype("auto", spec, cpu) == torch.float32  # half types are slow on CPU
    assert loader.choose_dtype("auto", spec, cuda) == torch.bfloat16
    assert loader.choose_dtype("float16", spec, cpu) == torch.float16


# bf16 rounds after every op and tusk's kernels add in another order than transformers, so bf16
# logits differ by a few bf16 ulps. Documented tolerance: the tokens must be identical up to the
# first step where they differ, and there transformers' own top-1 / top-2 logit margin must be
# under BF16_MARGIN (8 bf16 ulps at these logit sizes): a near-tie, where either token is a
# legitimate bf16 answer. After it the sequences diverge by construction. At least 4 tokens agree.
BF16_MARGIN = 0.25


def test_bfloat16_matches_transformers_within_margin(llama_dir: Path) -> None:
    import torch
    import transformers

    n = 12
    eng = LLMEngine(llama_dir, EngineConfig(num_kv_blocks=16, block_size=8, dtype="bfloat16"))
    assert eng.kv_cache.dtype == torch.bfloat16 and eng.fingerprint.dtype == "bfloat16"
    ours = eng.generate([PROMPT], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([PROMPT])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    theirs = out.sequences[0, len(PROMPT) :].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), n)
    assert same >= 4, f"{ours} vs {theirs}"
    if same < n:
        top2 = out.scores[same][0].float().topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin < BF16_MARGIN, f"step {same} differs at a clear margin {margin}: {ours} vs {theirs}"


def test_llama_attention_and_mlp_biases(tmp_path: Path) -> None:
    """HF Llama with attention_bias biases q, k, v and o; with mlp_bias gate, up and down."""
    folder = save_model(tmp_path / "biased", "llama", seed=8, attention_bias=True, mlp_bias=True)
    eng = check_matches_transformers(folder)
    assert eng.spec.o_bias and eng.spec.mlp_bias and eng.model.layers[0].down_bias is not None


def test_unused_or_missing_tensors_fail_loading(tmp_path: Path, llama_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama_dir / "model.safetensors")
    extra = tmp_path / "extra"
    shutil.copytree(llama_dir, extra)
    save_file({**tensors, "model.layers.0.mlp.down_proj.bias": torch.zeros(64)}, extra / "model.safetensors")
    with pytest.raises(loader.ModelLoadError, match=r"does not use: model\.layers\.0\.mlp\.down_proj\.bias"):
        LLMEngine(extra, EngineConfig(num_kv_blocks=4))

    missing = tmp_path / "missing"
    shutil.copytree(llama_dir, missing)
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(loader.ModelLoadError) as err:
        LLMEngine(missing, EngineConfig(num_kv_blocks=4))
    assert (
        "lacks tensors LlamaForCausalLM needs: model.layers.1.self_attn.k_proj.weight, model.norm.weight"
        in str(err.value)
    )

    wrong = tmp_path / "wrong-heads"
    shutil.copytree(llama_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the weights have 2
    (wrong / "config.json").write_text(json.dumps(config))
    shape_error = r"q/k/v_proj.weight has shape \(128, 64\), but config.json implies \(192, 64\)"
    with pytest.raises(loader.ModelLoadError, match=shape_error):
        LLMEngine(wrong, EngineConfig(num_kv_blocks=4))


def test_clear_errors(tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(loader.ModelLoadError, match="does not exist"):
        loader.resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(loader.ModelLoadError, match="no config.json"):
        loader.resolve_model_path(str(tmp_path / "empty"))

    bad = tmp_path / "gpt2"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(loader.ModelLoadError, match="unsupported architecture"):
        LLMEngine(bad, EngineConfig(num_kv_blocks=4))

    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(llama_dir / "config.json", noweights / "config.json")
    with pytest.raises(loader.ModelLoadError, match="no \\*.safetensors"):
        LLMEngine(noweights, EngineConfig(num_kv_blocks=4))

    with pytest.raises(loader.ModelLoadError, match="exceeds"):
        LLMEngine(llama_dir, EngineConfig(num_kv_blocks=4, max_model_len=100_000))

    for bad_id in ("hf://", "hf://just-a-name", "hf://a/b/c"):
        with pytest.raises(loader.ModelLoadError, match="hf://org/name"):
            loader.resolve_model_path(bad_id)
    import builtins

    real_import = builtins.__import__

    def no_hub(name: str, *args: object, **kwargs: object):
        if name.startswith("huggingface_hub"):
            raise ImportError("no hub here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(loader.ModelLoadError, match="huggingface_hub"):
        loader.resolve_model_path("hf://org/name@main")


def test_block_manager_refcounts_prefix_hits_and_lru_events() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(2)
    assert a is not None and bm.num_free == 2
    assert bm.register(a[0], 100) and bm.register(a[1], 101)
    assert not bm.register(a[1], 102)  # already holds a block
    shared = bm.acquire_cached([100, 101, 999])
    assert shared == a and bm.ref_count(a[0]) == 2
    bm.release(a)
    bm.release(shared)
    assert bm.num_free == 4 and bm.num_cached == 2  # cached blocks stay until evicted
    assert [(e.stored, e.block_hash) for e in bm.drain_events()] == [(True, 100), (True, 101)]
    assert bm.allocate(5) is None
    fresh = bm.allocate(3)  # two free blocks, then the LRU cached one: the tail (101) goes first
    assert fresh is not None
    assert [(e.stored, e.block_hash) for e in bm.drain_events()] == [(False, 101)]
    assert bm.cached_prefix_len([100, 101]) == 1


def test_mistral_sliding_window_smaller_than_the_prompt(tmp_path: Path) -> None:
    """A window of 8 under a 19-token prompt and 10 more tokens: prefill (whole and chunked) and
    decode must all drop the keys that fell out of the window, as transformers does."""
    folder = save_model(tmp_path / "mistral-sw", "mistral", seed=6, sliding_window=8)
    eng = check_matches_transformers(folder, n=10)
    assert eng.spec.layer_windows == (8, 8) and eng.max_model_len == 512  # no longer capped
    expected = hf_greedy(folder, PROMPT, 10)
    chunked = LLMEngine(
        folder, EngineConfig(num_kv_blocks=32, block_size=4, max_num_batched_tokens=5, max_num_seqs=5)
    )
    assert chunked.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True)) == [expected]


def test_hub_snapshots_bring_the_chat_template(tmp_path: Path, monkeypatch) -> None:
    """transformers 5 repos keep the template in chat_template.jinja; both resolvers download it."""
    import fnmatch

    import huggingface_hub

    from tusk.model_source import resolve_model

    repo = save_model(tmp_path / "repo", "llama", seed=35)
    for name in ("tokenizer.json", "chat_template.jinja", "pytorch_model.bin", "README.md"):
        (repo / name).write_text("{}")

    def fake_snapshot(repo_id: str, revision=None, allow_patterns=(), **_: object) -> str:
        out = tmp_path / "snap" / repo_id.replace("/", "--")
        out.mkdir(parents=True, exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, out / file.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    for folder in (loader.resolve_model_path("hf://org/a"), resolve_model("hf://org/b").path):
        names = {p.name for p in folder.iterdir()}
        assert {"chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"} <= names
        assert "pytorch_model.bin" not in names and "README.md" not in names

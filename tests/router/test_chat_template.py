"""Chat templates rendered exactly as transformers renders them, from wherever transformers 5
keeps them, and bad templates as one-line errors instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template
from tusk.router.errors import APIError
from tusk.router.tokenizer import ModelTokenizer, TokenizerError

MESSAGES = [
    {"role": "system", "content": "Use <b>tags</b> & 'quotes' — ünïcode."},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "answer"},
    {"role": "user", "content": "second"},
]

# Every Jinja feature transformers enables, in one template.
FEATURES = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m | tojson }}{% continue %}{% endif %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}"
    "<|{{ m.role }}|>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}"
    "{{ {'z': 1, 'a': '<&>'} | tojson(indent=2) }}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _files(tiny_model: Path, config: dict, template_file: str | None = None) -> dict[str, bytes]:
    files = {
        "tokenizer.json": (tiny_model / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": json.dumps(config).encode(),
    }
    if template_file is not None:
        files["chat_template.jinja"] = template_file.encode()
    return files


def _expected(template: str, **special: str) -> str:
    return render_jinja_template([MESSAGES], chat_template=template, add_generation_prompt=True, **special)[
        0
    ][0]


def test_hf_jinja_features_render_like_transformers(tiny_model) -> None:
    tok = ModelTokenizer(_files(tiny_model, {"chat_template": FEATURES, "eos_token": "</s>"}))
    rendered = tok.render_chat(MESSAGES)
    assert rendered == _expected(FEATURES, eos_token="</s>")
    assert '"content": "Use <b>tags</b> & \'quotes\' — ünïcode."' in rendered  # no escaping, keys in order
    assert "second" not in rendered  # {% break %}


def test_chat_template_jinja_file_wins_over_tokenizer_config(tiny_model) -> None:
    jinja = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    tok = ModelTokenizer(_files(tiny_model, {"chat_template": "old"}, template_file=jinja))
    assert tok.render_chat(MESSAGES) == _expected(jinja)


def test_chat_template_file_alone_is_enough(tiny_model) -> None:
    tok = ModelTokenizer(_files(tiny_model, {}, template_file="{{ messages[0].content }}"))
    assert tok.has_chat_template and tok.render_chat(MESSAGES) == MESSAGES[0]["content"]


def test_named_templates_use_default(tiny_model) -> None:
    named = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages | length }}"},
    ]
    tok = ModelTokenizer(_files(tiny_model, {"chat_template": named}))
    assert tok.render_chat(MESSAGES) == "4"


def test_named_templates_without_default_is_a_one_line_error(tiny_model) -> None:
    with pytest.raises(TokenizerError, match="none is named 'default'"):
        ModelTokenizer(_files(tiny_model, {"chat_template": [{"name": "tool_use", "template": "x"}]}))


@pytest.mark.parametrize(
    "template",
    [
        "{% do messages.append(1) %}",  # the `do` extension is not one transformers enables
        "{% for m in messages %}{{ m.content }}",  # unclosed block
        "{{ messages | no_such_filter }}",
    ],
)
def test_unsupported_template_fails_at_load_in_one_line(tiny_model, template) -> None:
    with pytest.raises(TokenizerError) as info:
        ModelTokenizer(_files(tiny_model, {"chat_template": template}))
    message = str(info.value)
    assert message.startswith("the chat template does not compile") and "\n" not in message


def test_raise_exception_and_runtime_errors_are_400s(tiny_model) -> None:
    raising = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    tok = ModelTokenizer(_files(tiny_model, {"chat_template": raising}))
    with pytest.raises(APIError) as info:
        tok.render_chat(MESSAGES)
    assert info.value.status == 400 and "user first" in info.value.message
    broken = ModelTokenizer(_files(tiny_model, {"chat_template": "{{ messages[0].content + 1 }}"}))
    with pytest.raises(APIError) as info:
        broken.render_chat(MESSAGES)
    assert info.value.status == 400


def test_worker_sends_chat_template_jinja_to_routers(tiny_model, tmp_path) -> None:
    """A router that discovered a worker renders chats from the files GetModelInfo sent."""
    import asyncio

    from tusk.router.workers import WorkerClient
    from tusk.worker.server import Worker

    from tusk.config import EngineConfig, KVTierConfig, Role, WorkerConfig

    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).symlink_to(f)
    jinja = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(jinja)

    async def fetch() -> dict[str, bytes]:
        worker = Worker(
            WorkerConfig(
                model=str(folder),
                engine=EngineConfig(num_kv_blocks=8, block_size=16),
                kv_tier=KVTierConfig(host_cache_blocks=0),
            )
        )
        address = await worker.start()
        client = WorkerClient(address, Role.BOTH)
        try:
            return dict((await client.model_info()).files)
        finally:
            await client.close()
            await worker.stop(drain_timeout=0)

    files = asyncio.run(fetch())
    assert files["chat_template.jinja"] == jinja.encode()
    assert ModelTokenizer(files).render_chat(MESSAGES[1:2]) == "<user>first"

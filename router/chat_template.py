"""Chat templates the way Hugging Face transformers renders them.

A model's template is Jinja written against transformers' environment, so the router builds the
same one (``transformers.utils.chat_template_utils._compile_jinja_template``): a sandboxed,
immutable environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension
(``{% break %}``, ``{% continue %}``), the ``{% generation %}`` block (transformers uses it to mark
assistant tokens for training; rendering just emits its body), a ``tojson`` filter that neither
escapes HTML nor sorts keys, and the ``raise_exception`` and ``strftime_now`` globals.

Where a template comes from, in transformers 5's order: ``chat_template.jinja`` beside the
tokenizer, else ``tokenizer_config.json``'s ``chat_template``, which is either one string or a list
of named templates (the one named ``default`` is used; ``tool_use`` is only for tool calls, which
tusk refuses). A template that does not compile is a one-line ``TokenizerError`` at start.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The model's chat template cannot be used; the message says why, in one line."""


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson, which HTML-escapes <, >, & and ' and sorts keys.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SandboxedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with its attribute check remembered per (type, attribute name).

    Jinja's answer depends on nothing else (underscore names, the internal attributes of
    functions, frames, generators..., and the mutating methods of known mutable types), but
    computing it costs a dozen ``isinstance`` checks against ABCs on every ``loop.first`` or
    ``message.content``: a third of rendering a ten-message chat."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._safe: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        safe = self._safe.get(key)
        if safe is None:
            safe = super().is_safe_attribute(obj, attr, value)
            if len(self._safe) < 4096:
                self._safe[key] = safe
        return safe


def _environment() -> ImmutableSandboxedEnvironment:
    env = _SandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


def select_template(files: dict[str, bytes], tokenizer_config: dict[str, Any]) -> str | None:
    """The template text to use, or None when the model has none."""
    if files.get(TEMPLATE_FILE):
        return files[TEMPLATE_FILE].decode()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            names = ", ".join(sorted(str(n) for n in named)) or "none"
            raise ChatTemplateError(f"chat templates are named ({names}) but none is named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"chat_template must be a string or a list, not {type(template).__name__}")
    return template or None


class ChatTemplate:
    """A compiled template; ``render`` raises ``TemplateError`` for messages it rejects."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        try:
            self._template = _ENV.from_string(source)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" at line {line}" if line else ""
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ChatTemplateError(f"the chat template does not compile{where}: {first}") from None
        self._special = special_tokens

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self._special,
        )

"""The request path's shortcuts keep their guarantees: the chat-template sandbox still refuses
what it refused (its check is remembered per type and attribute), and log lines are still one
JSON object each."""

from __future__ import annotations

import io
import json
import logging

import pytest
from jinja2.exceptions import SecurityError
from tusk.router.chat_template import ChatTemplate
from tusk.router.logs import JsonFormatter, request_id_var


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.pop() }}",  # a mutating method of a known mutable type
        "{{ messages[0].clear() }}",
        "{{ (messages | first).update({}) }}",
    ],
)
def test_sandbox_refuses_unsafe_calls_every_time(source: str) -> None:
    template = ChatTemplate(source, {})
    for _ in range(3):  # the second and later checks come from the remembered answer
        with pytest.raises(SecurityError):
            template.render([{"role": "user", "content": "hi"}])


def test_sandbox_hides_internal_attributes_every_time() -> None:
    template = ChatTemplate("{{ messages.__class__ }}|{{ raise_exception.__globals__ }}|{{ loop }}", {})
    for _ in range(3):
        assert template.render([{"role": "user", "content": "hi"}]) == "||"


def test_safe_attributes_still_render() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ loop.index }}{{ m.role }}:{{ m.content.upper() }};{% endfor %}", {}
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert template.render(messages) == template.render(messages) == "1user:A;2assistant:B;"


def test_log_lines_are_json_with_extras_and_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tusk.test.fast_paths")
    logger.handlers[:] = [handler]
    logger.propagate = False
    token = request_id_var.set("req-1")
    try:
        logger.warning("done", extra={"status": 200, "path": object, "text": "ünï", "e2e_s": 0.5})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id_var.reset(token)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "done" and first["request_id"] == "req-1" and first["level"] == "warning"
    assert first["status"] == 200 and first["text"] == "ünï" and first["e2e_s"] == 0.5
    assert first["path"] == str(object)  # not JSON: logged as its str()
    assert second["msg"] == "failed" and "ValueError: boom" in second["exc"]

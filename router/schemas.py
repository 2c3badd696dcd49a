"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Unknown fields are rejected (``extra="forbid"``) and fields OpenAI defines but tusk cannot honour
yet are accepted by name only to be refused with a clear 400: a client that asks for tool calls
must learn that it did not get them, rather than silently receiving something else.

Implemented besides OpenAI's core: ``n``, ``logprobs``/``top_logprobs``, ``presence_penalty``,
``frequency_penalty``, and vLLM's extensions that benchmark clients send (``ignore_eos``,
``min_tokens``, ``top_k``, ``min_p``, ``repetition_penalty``,
``stream_options.continuous_usage_stats``), with vLLM's ranges. Floats must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator
from tusk.router.errors import APIError, bad_request

MAX_STOP_STRINGS = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage so far on every chunk


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


MAX_N = 16  # choices per request; each is one generation on the workers
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (and vLLM's default max_logprobs)

# Fields OpenAI defines that tusk does not implement, with the value that means "not used".
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}


def _finite(**bounds: float) -> Any:
    return Field(allow_inf_nan=False, **bounds)


class _SamplingBody(_Body):
    model: str = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, _finite(ge=0, le=2)] | None = None
    top_p: Annotated[float, _finite(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    presence_penalty: Annotated[float, _finite(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, _finite(ge=-2, le=2)] | None = None
    # Extensions (vLLM and SGLang accept the same names and ranges).
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1 = disabled
    min_p: Annotated[float, _finite(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, _finite(gt=0)] | None = None
    ignore_eos: StrictBool = False
    # Accepted by name only, refused unless they hold their "off" value.
    best_of: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingBody:
        for name in type(self).model_fields:
            allowed = _UNSUPPORTED_UNLESS.get(name)
            if allowed is not None and getattr(self, name) not in allowed:
                raise _Unsupported(name)
        if self.stream_options is not None and not self.stream:
            raise _Unsupported("stream_options", "stream_options is only allowed when stream is true")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            raise _Unsupported("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        if any(s == "" for s in stops):
            raise _Unsupported("stop", "stop strings must not be empty")
        limit = self.output_limit()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise _Unsupported(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})"
            )
        return self

    def choices(self) -> int:
        return self.n or 1

    def top_logprobs_count(self) -> int | None:
        """None = no logprobs; else the sampled token's plus this many alternatives."""
        raise NotImplementedError

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def output_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _logprobs_flag(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise _Unsupported("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: Any = None
    suffix: Any = None

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise _Unsupported(
                    "prompt", "only one prompt per request is supported (batch prompts are not)"
                )
            self.prompt = p[0]
        if isinstance(self.prompt, list) and not self.prompt:
            raise _Unsupported("prompt", "prompt must not be empty")
        return self


class _Unsupported(ValueError):
    """Raised inside validators; carries the offending field for the error's ``param``."""

    def __init__(self, param: str, message: str | None = None) -> None:
        super().__init__(message or f"`{param}` is not supported by this server")
        self.param = param


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Validate a JSON body, turning pydantic's report into one OpenAI-style 400."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _to_api_error(exc) from None


def _to_api_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    if kind == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            code="invalid_json",
        )
    if kind == "model_type" and not loc:
        return bad_request("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_field"
        )
    if kind == "missing":
        return bad_request(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    ctx = first.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _Unsupported):
        return bad_request(str(inner), param=inner.param, code="unsupported_parameter")
    return bad_request(f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")

"""Errors in OpenAI's wire format.

Clients (the official SDKs, LangChain, curl scripts) branch on ``error.type`` and the HTTP
status, so every failure the router knows about is raised as an ``APIError`` and rendered in
exactly one place, instead of each handler inventing its own body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class APIError(Exception):
    """A failure the client should see, with OpenAI's status and error type."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> Response:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=headers, media_type="application/json"
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def no_worker(model: str) -> APIError:
    return APIError(
        503,
        f"No ready worker serves model `{model}` right now; retry later.",
        type="service_unavailable",
        code="no_ready_worker",
        headers={"Retry-After": "1"},
    )


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(
        429,
        "The router's request queue is full; retry later.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def worker_failed(message: str) -> APIError:
    return APIError(502, message, type="server_error", code="worker_error")


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s.", type="timeout", code="timeout")

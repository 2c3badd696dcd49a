"""Which worker failures may be retried on another worker (router/failures.py)."""

from __future__ import annotations

import grpc
import pytest
from tusk.router.failures import Failure, classify, is_request_error


def _error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "prompt too long", Failure.FINAL),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "can never fit", Failure.FINAL),
        (grpc.StatusCode.OUT_OF_RANGE, "", Failure.FINAL),
        (grpc.StatusCode.INTERNAL, "engine failed: boom", Failure.FINAL),
        (grpc.StatusCode.UNKNOWN, "Exception calling application", Failure.FINAL),
        (grpc.StatusCode.ALREADY_EXISTS, "request id is already running", Failure.FINAL),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused",
            Failure.RETRY,
        ),
        (grpc.StatusCode.UNAVAILABLE, "worker is draining; retry on another worker", Failure.RETRY),
        (grpc.StatusCode.ABORTED, "prefill was cancelled", Failure.RETRY),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", Failure.SUSPECT),
        (grpc.StatusCode.UNAVAILABLE, "Connection reset by peer", Failure.SUSPECT),
    ],
)
def test_failures_are_classified(code, details, expected) -> None:
    assert classify(_error(code, details)) is expected


def test_request_errors_are_the_clients() -> None:
    assert is_request_error(_error(grpc.StatusCode.INVALID_ARGUMENT))
    assert is_request_error(_error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert not is_request_error(_error(grpc.StatusCode.INTERNAL))

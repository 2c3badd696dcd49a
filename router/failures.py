"""What a failed worker call means for the request: retry elsewhere, or answer the client now.

Retrying blindly turns one bad request into several failures: a prompt the worker rejects is
rejected by every worker, and a request that crashes its worker (a "poison" request) would crash
the next one too. So each gRPC failure is put in one of three classes:

- ``FINAL``: the worker judged the request itself (INVALID_ARGUMENT, OUT_OF_RANGE,
  RESOURCE_EXHAUSTED for a request that can never fit, ALREADY_EXISTS, a deadline) or failed
  while running it (INTERNAL, UNKNOWN: the engine raised on it). Another worker would answer the
  same, or fail the same way; the client gets the error at once.
- ``RETRY``: the worker never took the request (connection refused, a draining worker's
  UNAVAILABLE or ABORTED, a cancelled call). Safe to send elsewhere, up to ``MAX_ATTEMPTS``.
- ``SUSPECT``: the connection broke while the worker had the request (the process died). It may
  be a coincidence or the request's fault; one such failure is retried, a second ends the
  request, so a poison request costs at most one more worker.
"""

from __future__ import annotations

from enum import Enum

import grpc

MAX_ATTEMPTS = 3  # tries per request in all
MAX_SUSPECT = 1  # broken connections a request may survive

# Said by a worker about the request itself: the same everywhere.
_REQUEST_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Markers of a call that never reached the worker's handler, or that a worker refused politely.
_NEVER_TAKEN = ("failed to connect", "connection refused", "draining", "dns resolution failed")


class Failure(Enum):
    FINAL = "final"
    RETRY = "retry"
    SUSPECT = "suspect"


def classify(exc: grpc.aio.AioRpcError) -> Failure:
    code = exc.code()
    if code in (grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        return Failure.RETRY
    if code == grpc.StatusCode.UNAVAILABLE:
        details = (exc.details() or "").lower()
        return Failure.RETRY if any(m in details for m in _NEVER_TAKEN) else Failure.SUSPECT
    return Failure.FINAL


def is_request_error(exc: grpc.aio.AioRpcError) -> bool:
    """The worker rejected the request as such: the client's fault, a 400."""
    return exc.code() in _REQUEST_ERRORS

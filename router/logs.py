"""Structured logs: one JSON object per line on stderr, carrying the request id.

Log shippers (Loki, Cloud Logging, Elastic) parse JSON lines without per-format rules, and a
request id on every line is what lets an operator follow one request across router and workers.
The id lives in a context variable so code deep in the request path need not pass it around.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tusk_request_id", default=None)

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_ENCODER = msgspec.json.Encoder(enc_hook=str)  # anything it cannot encode is logged as str()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry).decode()


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    # No caller lookup (file, line, function) per record: the JSON lines never show it, and the
    # frame walk is a good part of a log call's cost on the request path (logging docs,
    # "Optimization").
    logging._srcfile = None

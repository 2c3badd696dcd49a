"""Optional API-key auth (``Authorization: Bearer <key>``).

Keys come from the config, from ``TUSK_API_KEYS`` (comma separated) or from a file with one key
per line (``TUSK_API_KEYS_FILE``, typically a mounted Kubernetes Secret). The file is re-read when
it changes, because kubelet rotates mounted Secrets in place and a key rotation must not need a
router restart. No keys configured means auth is off.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from tusk.router.errors import APIError


class ApiKeys:
    def __init__(self, keys: list[str], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._static = {k for k in keys if k}
        self._static |= {k.strip() for k in env.get("TUSK_API_KEYS", "").split(",") if k.strip()}
        file = env.get("TUSK_API_KEYS_FILE")
        self._file = Path(file) if file else None
        self._file_stamp: float | None = None
        self._file_keys: set[str] = set()
        self._load_file()

    def _load_file(self) -> None:
        if self._file is None:
            return
        try:
            stamp = self._file.stat().st_mtime
        except OSError:
            self._file_keys = set()
            return
        if stamp != self._file_stamp:
            self._file_stamp = stamp
            lines = self._file.read_text().splitlines()
            self._file_keys = {line.strip() for line in lines if line.strip() and not line.startswith("#")}

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._file is not None

    def check(self, authorization: str | None) -> None:
        if not self.enabled:
            return
        self._load_file()
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        # Compare against every key so the time taken does not reveal which one nearly matched.
        ok = False
        for key in self._static | self._file_keys:
            ok |= hmac.compare_digest(key.encode(), token.encode())
        if not ok:
            raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )

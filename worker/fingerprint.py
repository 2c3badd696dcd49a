"""The model identity in KV-tier keys: a digest of the config and of every weight byte.

Two workers may share KV blocks only if they run the very same weights, so the identity covers
all of them; a sample (first and last bytes of each shard) lets two checkpoints that differ in a
middle layer read each other's blocks. Hashing a large checkpoint takes a while, so each weight
file's SHA-256 is computed once and cached beside the files in ``.tusk-fingerprint``, keyed by the
file's size and modification time; where the folder is read-only nothing is cached and the hash
is computed at every start. Files from the Hugging Face cache need no hashing at all: a snapshot
file links to ``blobs/<sha256>``, the hub's own SHA-256 of its content.

A GGUF model's identity is the SHA-256 of the GGUF file itself (its prepared folder's config is
derived from it), cached in the prepared folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger("tusk.worker.fingerprint")

CACHE_FILE = ".tusk-fingerprint"
_CACHE_VERSION = 1
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 the Hugging Face cache names a snapshot file's blob after, if it is one."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return target.name
    return None


def _read_cache(folder: Path) -> dict:
    try:
        cache = json.loads((folder / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cache.get("files", {}) if cache.get("version") == _CACHE_VERSION else {}


def _write_cache(folder: Path, files: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=CACHE_FILE, dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "files": files}, f, indent=1)
        os.replace(tmp, folder / CACHE_FILE)
    except OSError as exc:  # a read-only model volume: hash again next start
        log.info("cannot cache weight hashes in %s (%s); they will be computed at every start", folder, exc)
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def file_sha256s(folder: Path, files: list[Path]) -> dict[str, str]:
    """SHA-256 of each weight file (by name), from the hub's blob names, the cache or by hashing."""
    cached = _read_cache(folder)
    result: dict[str, str] = {}
    fresh: dict[str, dict] = {}
    for file in files:
        blob = hub_blob_sha256(file)
        if blob is not None:
            result[file.name] = blob
            continue
        stat = file.stat()  # follows links: a GGUF's prepared folder links to the file
        entry = cached.get(file.name)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            result[file.name] = entry["sha256"]
        else:
            with open(file, "rb") as f:
                result[file.name] = hashlib.file_digest(f, "sha256").hexdigest()
            fresh[file.name] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": result[file.name],
            }
    if fresh:
        _write_cache(folder, {**cached, **fresh})
    return result


def model_identity(folder: Path, files: list[Path]) -> str:
    """16 hex digits naming the model: config.json plus every weight file's SHA-256."""
    h = hashlib.blake2b(digest_size=8)
    h.update((folder / "config.json").read_bytes())
    for name, sha in sorted(file_sha256s(folder, files).items()):
        h.update(f"{name}:{sha};".encode())
    return h.hexdigest()

"""The model identity in KV-tier keys: a digest of the config and of every weight byte.

Two workers may share KV blocks only if they run the very same weights, so the identity covers
all of them; a sample (first and last bytes of each shard) lets two checkpoints that differ in a
middle layer read each other's blocks. Hashing a large checkpoint takes a while, so each weight
file's SHA-256 is computed once and cached beside the files in ``.tusk-fingerprint``, keyed by the
file's size and modification time; where the folder is read-only (a model volume) the cache goes
to the tusk cache folder instead (``$TUSK_CACHE_DIR/fingerprints/``), and where neither is
writable the hash is computed at every start. Files from the Hugging Face cache need no hashing at all: a snapshot
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


def _cache_paths(folder: Path) -> list[Path]:
    """Beside the weights first, then in the tusk cache (keyed by the folder's location)."""
    from tusk.tiny_model import default_cache_dir

    key = hashlib.blake2b(str(folder.resolve()).encode(), digest_size=8).hexdigest()
    return [folder / CACHE_FILE, default_cache_dir() / "fingerprints" / f"{key}.json"]


def _read_cache(folder: Path) -> dict:
    files: dict = {}
    for path in reversed(_cache_paths(folder)):  # beside the weights wins
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if cache.get("version") == _CACHE_VERSION:
            files.update(cache.get("files", {}))
    return files


def _write_cache(folder: Path, files: dict) -> None:
    for path in _cache_paths(folder):
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=CACHE_FILE, dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "files": files}, f, indent=1)
            os.replace(tmp, path)
            return
        except OSError as exc:
            log.info("cannot cache weight hashes in %s (%s)", path, exc)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    log.warning("weight hashes of %s cannot be cached; they are computed at every start", folder)


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

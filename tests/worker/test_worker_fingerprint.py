"""The model identity in KV-tier keys covers every weight byte, is cached beside the files, and
uses the hub's blob SHA-256 where there is one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from tusk.worker import loader
from tusk.worker.fingerprint import CACHE_FILE
from worker_models import save_gguf, save_model


def test_checkpoints_differing_only_in_a_middle_layer_differ(tmp_path: Path) -> None:
    a = save_model(tmp_path / "a", "llama", seed=31, num_hidden_layers=5)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(b / "model.safetensors")
    name = "model.layers.2.mlp.up_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][7, 3] += 1.0  # same shapes, sizes and first/last 64 KiB; one weight differs
    save_file(tensors, b / "model.safetensors", metadata={"format": "pt"})
    size = (a / "model.safetensors").stat().st_size
    assert size == (b / "model.safetensors").stat().st_size and size > 4 * 65536
    ends = [
        (f.read_bytes()[:65536], f.read_bytes()[-65536:])
        for f in (a / "model.safetensors", b / "model.safetensors")
    ]
    assert ends[0] == ends[1]
    assert loader.model_digest(a) != loader.model_digest(b)
    assert loader.model_digest(a) == loader.model_digest(a)


def test_hashes_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    folder = save_model(tmp_path / "m", "llama", seed=32)
    first = loader.model_digest(folder)
    cache = json.loads((folder / CACHE_FILE).read_text())
    entry = cache["files"]["model.safetensors"]
    assert entry["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    entry["sha256"] = "0" * 64  # a cached hash is trusted while size and mtime match...
    (folder / CACHE_FILE).write_text(json.dumps(cache))
    assert loader.model_digest(folder) != first
    stat = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert loader.model_digest(folder) == first  # ...and recomputed once the file changed

    unwritable = tmp_path / "ro"
    shutil.copytree(folder, unwritable)
    (unwritable / CACHE_FILE).unlink()
    (unwritable / CACHE_FILE).mkdir()  # stands in for a read-only volume (tests run as root)
    monkeypatch.setenv("TUSK_CACHE_DIR", str(tmp_path / "cache"))
    assert loader.model_digest(unwritable) == first
    [fallback] = (tmp_path / "cache" / "fingerprints").iterdir()  # cached in the tusk cache instead
    cached = json.loads(fallback.read_text())
    cached["files"]["model.safetensors"]["sha256"] = "1" * 64
    fallback.write_text(json.dumps(cached))
    assert loader.model_digest(unwritable) != first  # and used from there
    (tmp_path / "cache").rename(tmp_path / "cache-gone")
    (tmp_path / "cache").write_text("")  # neither place writable: computed every time
    assert loader.model_digest(unwritable) == first


def test_hub_snapshot_uses_the_blob_sha256(tmp_path: Path) -> None:
    source = save_model(tmp_path / "src", "llama", seed=33)
    sha = "ab" * 32
    blobs = tmp_path / "hub" / "blobs"
    snapshot = tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    shutil.copy(source / "model.safetensors", blobs / sha)
    (snapshot / "model.safetensors").symlink_to(blobs / sha)
    shutil.copy(source / "config.json", snapshot / "config.json")
    digest = loader.model_digest(snapshot)
    assert not (snapshot / CACHE_FILE).exists()  # nothing was hashed
    expected = hashlib.blake2b(digest_size=8)
    expected.update((snapshot / "config.json").read_bytes())
    expected.update(f"model.safetensors:{sha};".encode())
    assert digest == expected.hexdigest()


def test_gguf_identity_is_the_file_hash(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TUSK_CACHE_DIR", str(tmp_path / "cache"))
    source = save_model(tmp_path / "src", "llama", seed=34, vocab_size=263)
    path = save_gguf(tmp_path / "m.gguf", source, "Q8_0")
    folder = loader.resolve_model_path(str(path))
    loader.model_digest(folder)
    cache = json.loads((folder / CACHE_FILE).read_text())
    assert cache["files"]["model.gguf"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

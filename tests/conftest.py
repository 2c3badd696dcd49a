"""Fixtures shared by every test area: the tiny model, a real KV tier server, free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tusk.kvserver import EmbeddedServer, free_port, start_server

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tusk_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache shared by all tests of the session (and by child processes via TUSK_CACHE_DIR)."""
    existing = os.environ.get("TUSK_TEST_CACHE_DIR")
    path = Path(existing) if existing else tmp_path_factory.mktemp("tusk-cache")
    os.environ["TUSK_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tusk_cache_dir: Path) -> Path:
    """Folder of the embedded default model (config.json, safetensors, tokenizer.json)."""
    from tusk.tiny_model import tiny_model_dir

    return tiny_model_dir(tusk_cache_dir)


@pytest.fixture
def kv_server() -> Iterator[EmbeddedServer]:
    """A real Valkey/Redis server on a free loopback port, stopped (or already killed) after."""
    server = start_server(maxmemory="256mb")
    yield server
    server.stop()


@pytest.fixture
def unused_port() -> int:
    return free_port()

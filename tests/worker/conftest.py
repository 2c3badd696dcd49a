"""Tiny random checkpoints shared by the worker tests (built once per session, in well under a second)."""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_models import ARCHS, save_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker-models")
    return {arch: save_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]

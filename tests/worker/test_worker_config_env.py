"""The operator hands an external tier's URL (with a Secret's password) through the environment."""

from __future__ import annotations

import json

import pytest
from tusk.worker.server import load_config

from tusk.config import WorkerConfig


def _config_json(url: str | None) -> str:
    return WorkerConfig(model="/m", kv_tier={"url": url, "host_cache_blocks": 7}).model_dump_json()


def test_environment_url_wins(monkeypatch):
    monkeypatch.setenv("TUSK_KV_TIER_URL", "redis://:s3cret@cache:6379/0")
    config = load_config(["--config-json", _config_json("redis://other:6379/0")])
    assert config.kv_tier.url == "redis://:s3cret@cache:6379/0"
    assert config.kv_tier.host_cache_blocks == 7


def test_without_environment_the_file_decides(monkeypatch, tmp_path):
    monkeypatch.delenv("TUSK_KV_TIER_URL", raising=False)
    path = tmp_path / "worker.json"
    path.write_text(_config_json("redis://file:6379/0"))
    assert load_config(["--config", str(path)]).kv_tier.url == "redis://file:6379/0"


def test_bad_environment_url_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TUSK_KV_TIER_URL", "http://nope")
    with pytest.raises(ValueError, match="redis://"):
        load_config(["--config-json", json.dumps({"model": "/m"})])

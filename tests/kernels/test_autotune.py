"""The disk-cached autotuner: tunes once per (kernel, bucket), reuses the winner after a restart."""

from __future__ import annotations

import json

import pytest
from tusk.kernels.autotune import Autotuner, bucket, default_cache_dir

CANDIDATES = [{"BLOCK": 32}, {"BLOCK": 64}, {"BLOCK": 128}]
COST = {32: 3.0, 64: 1.0, 128: 2.0}


def _timer(calls: list):
    def time_config(config):
        calls.append(config)
        return COST[config["BLOCK"]]

    return time_config


def test_tunes_once_and_survives_restart(tmp_path):
    calls: list = []
    tuner = Autotuner("NVIDIA H100 80GB HBM3", tmp_path)
    assert tuner.best("decode", ("f16", 64), CANDIDATES, _timer(calls)) == {"BLOCK": 64}
    assert len(calls) == 3
    assert tuner.best("decode", ("f16", 64), CANDIDATES, _timer(calls)) == {"BLOCK": 64}
    assert len(calls) == 3
    stored = json.loads((tmp_path / "NVIDIA_H100_80GB_HBM3.json").read_text())
    assert stored == {"decode|f16|64": {"BLOCK": 64}}

    restarted = Autotuner("NVIDIA H100 80GB HBM3", tmp_path)
    assert restarted.best("decode", ("f16", 64), CANDIDATES, _timer(calls)) == {"BLOCK": 64}
    assert restarted.timings_run == 0 and len(calls) == 3
    # another bucket tunes again and both entries are kept on disk
    restarted.best("decode", ("f16", 128), CANDIDATES, _timer(calls))
    assert len(json.loads((tmp_path / "NVIDIA_H100_80GB_HBM3.json").read_text())) == 2


def test_failing_configs_are_skipped_and_all_failing_is_an_error(tmp_path):
    def flaky(config):
        if config["BLOCK"] == 64:
            raise RuntimeError("out of shared memory")
        return COST[config["BLOCK"]]

    assert Autotuner("gpu", tmp_path).best("k", (1,), CANDIDATES, flaky) == {"BLOCK": 128}

    def broken(config):
        raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="every candidate"):
        Autotuner("gpu", tmp_path).best("k", (2,), CANDIDATES, broken)


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    (tmp_path / "gpu.json").write_text("{not json")
    assert Autotuner("gpu", tmp_path).best("k", (1,), CANDIDATES, _timer([])) == {"BLOCK": 64}
    assert json.loads((tmp_path / "gpu.json").read_text()) == {"k|1": {"BLOCK": 64}}


def test_stale_entry_not_in_candidates_is_retuned(tmp_path):
    (tmp_path / "gpu.json").write_text(json.dumps({"k|1": {"BLOCK": 999}}))
    calls: list = []
    assert Autotuner("gpu", tmp_path).best("k", (1,), CANDIDATES, _timer(calls)) == {"BLOCK": 64}
    assert len(calls) == 3


def test_disabled_tuning_uses_first_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv("TUSK_AUTOTUNE", "0")
    calls: list = []
    assert Autotuner("gpu", tmp_path).best("k", (1,), CANDIDATES, _timer(calls)) == {"BLOCK": 32}
    assert calls == []


def test_cache_dir_and_buckets(monkeypatch, tmp_path):
    monkeypatch.setenv("TUSK_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "autotune"
    monkeypatch.delenv("TUSK_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "tusk", "autotune")
    assert [bucket(n) for n in (0, 1, 2, 3, 17, 64)] == [1, 1, 2, 4, 32, 64]

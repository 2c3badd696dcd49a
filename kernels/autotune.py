"""Disk-cached launch-config tuning for Triton kernels, per device and shape bucket.

Triton's own autotuner re-benchmarks after every restart; a worker that restarts (rolling
update, crash) would pay that on its first requests. Here the winner of each (kernel, shape
bucket) is stored in one JSON file per device model under $TUSK_CACHE_DIR/autotune (default
~/.cache/tusk/autotune), and later processes on the same device model reuse it without timing.
TUSK_AUTOTUNE=0 disables timing (the first candidate is used); the interpreter never times.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tusk.kernels.autotune")

Config = dict[str, int]


def default_cache_dir() -> Path:
    root = os.environ.get("TUSK_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "tusk"
    return base / "autotune"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


def bucket(n: int) -> int:
    """Power-of-two bucket of a size, so nearby shapes share one tuned config."""
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))


class Autotuner:
    """Best launch config per (kernel, bucket) for one device model, persisted as JSON."""

    def __init__(self, device_name: str, cache_dir: Path | None = None) -> None:
        self.path = (cache_dir or default_cache_dir()) / f"{_slug(device_name)}.json"
        self._lock = threading.Lock()
        self._table: dict[str, Config] | None = None
        self.timings_run = 0

    def _load(self) -> dict[str, Config]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
                if not isinstance(self._table, dict):
                    raise ValueError("not a JSON object")
            except FileNotFoundError:
                self._table = {}
            except (ValueError, OSError) as exc:
                log.warning("ignoring unreadable autotune cache %s: %s", self.path, exc)
                self._table = {}
        return self._table

    def _save(self, key: str, config: Config) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged: dict[str, Config] = {}
            try:
                merged = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):
                pass
            merged[key] = config
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-")
            with os.fdopen(fd, "w") as handle:
                json.dump(merged, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write autotune cache %s: %s", self.path, exc)

    def best(
        self,
        kernel: str,
        shape_bucket: tuple,
        candidates: list[Config],
        time_config: Callable[[Config], float],
        enabled: bool = True,
    ) -> Config:
        """The cached winner, else time every candidate (seconds; an exception = unusable) and cache it."""
        if not candidates:
            raise ValueError(f"autotune {kernel}: no candidate configs")
        key = f"{kernel}|{'|'.join(map(str, shape_bucket))}"
        with self._lock:
            cached = self._load().get(key)
            if cached is not None and cached in candidates:
                return cached
            if not enabled or os.environ.get("TUSK_AUTOTUNE", "1") == "0":
                return candidates[0]
            timings = []
            for config in candidates:
                try:
                    timings.append(time_config(config))
                except Exception as exc:  # e.g. out of shared memory for this config
                    log.debug("autotune %s config %s failed: %s", kernel, config, exc)
                    timings.append(math.inf)
                self.timings_run += 1
            best_index = min(range(len(candidates)), key=timings.__getitem__)
            if math.isinf(timings[best_index]):
                raise RuntimeError(
                    f"autotune {kernel}: every candidate config failed for bucket {shape_bucket}"
                )
            winner = candidates[best_index]
            self._load()[key] = winner
            self._save(key, winner)
            log.info(
                "autotune %s %s -> %s (%.3g ms)", kernel, shape_bucket, winner, timings[best_index] * 1e3
            )
            return winner


_tuners: dict[str, Autotuner] = {}


def tuner_for(device_name: str) -> Autotuner:
    tuner = _tuners.get(device_name)
    if tuner is None:
        tuner = _tuners.setdefault(device_name, Autotuner(device_name))
    return tuner

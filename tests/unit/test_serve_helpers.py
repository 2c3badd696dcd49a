"""Pure pieces of `tusk serve`."""

from __future__ import annotations

import os

from tusk.serve import cpu_threads_per_worker


def test_cores_are_split_between_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert cpu_threads_per_worker(2) == {"OMP_NUM_THREADS": "4"}
    assert cpu_threads_per_worker(3) == {"OMP_NUM_THREADS": "2"}
    assert cpu_threads_per_worker(16) == {"OMP_NUM_THREADS": "1"}


def test_users_thread_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_worker(2) == {}

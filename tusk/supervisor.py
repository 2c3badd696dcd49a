"""Starting child processes that announce readiness, and stopping all of them for sure.

``tusk serve`` runs a whole deployment as local processes. Two things must hold whatever
happens: it knows when each child is really serving (the child prints one JSON line with
``"event": "ready"`` on stdout), and no child outlives it. Children get ``PR_SET_PDEATHSIG`` so
that even a SIGKILL of the parent takes them down, and ``stop_all`` terminates in reverse start
order, then kills what did not exit in time.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children are still stopped by stop_all on a clean exit
        pass


class ChildFailed(RuntimeError):
    """A child exited or did not become ready; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    ready_info: dict = field(default_factory=dict)
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it after fork
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.close()
        threading.Thread(target=self._drain_stdout, name=f"{self.name}-stdout", daemon=True).start()

    def _drain_stdout(self) -> None:
        """Find the ready line, then keep reading so the child never blocks on a full pipe."""
        assert self.process and self.process.stdout
        with open(self.log_path, "ab") as log:
            for raw in self.process.stdout:
                if not self._ready.is_set():
                    try:
                        info = json.loads(raw)
                    except ValueError:
                        info = None
                    if isinstance(info, dict) and info.get("event") == "ready":
                        self.ready_info = info
                        self._ready.set()
                        continue
                log.write(raw)
                log.flush()

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.process is None or self.process.poll() is not None:
                raise ChildFailed(f"{self.name} exited during start-up: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} was not ready after {timeout:.0f}s: {self.log_tail()}")
        return self.ready_info

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        meaningful = [line for line in text if line.strip()]
        return " | ".join(meaningful[-lines:]) if meaningful else "no output"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.alive():
            assert self.process
            self.process.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM every child (last started first), then SIGKILL whatever outlives ``timeout``."""
    for child in reversed(children):
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in reversed(children):
        child.wait_or_kill(deadline)


def python_module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env

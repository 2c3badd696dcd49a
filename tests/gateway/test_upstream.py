"""The proxy's HTTP/1.1 client: chunked and sized bodies, keep-alive reuse, stale connections."""

from __future__ import annotations

import asyncio

import pytest
from tusk.router.upstream import UpstreamError, UpstreamPool


async def _server(handler) -> tuple[asyncio.AbstractServer, str]:  # noqa: ANN001
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_chunked_and_sized_bodies_reuse_and_stale_connections() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                        b":"
                    )[1]
                )
                body = await reader.readexactly(length)
                seen.append(body)
                if body == b"chunked":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
                    )
                    writer.write(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                elif body == b"close":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye")
                    await writer.drain()
                    writer.close()  # the next request on this connection finds it closed
                    return
                else:
                    writer.write(
                        b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nx-other: 1\r\n\r\n" + body[:4]
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server, address = await _server(handler)
    pool = UpstreamPool(address)
    try:
        reply = await pool.post("/v1/completions", b"chunked")
        assert reply.status == 200 and reply.headers[b"content-type"] == b"text/event-stream"
        assert [c async for c in reply.chunks()] == [b"hello", b" world"]
        reply = await pool.post("/v1/completions", b"sized body")
        assert (reply.status, await reply.read()) == (201, b"size")
        assert connections == 1  # one keep-alive connection so far
        assert await (await pool.post("/x", b"close")).read() == b"bye"
        await asyncio.sleep(0.05)
        assert await (await pool.post("/x", b"again")).read() == b"agai"  # stale one retried fresh
        assert connections == 2
    finally:
        pool.close()
        server.close()
    with pytest.raises(UpstreamError):
        await UpstreamPool(address).post("/x", b"nobody listens")

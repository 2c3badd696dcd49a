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
        assert [c async for c in reply.chunks()] == [b"hello world"]  # both chunks came in one write
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


async def test_router_stream_pass_through_and_client_hang_up(tiny_model) -> None:  # noqa: ANN001
    """A streamed answer reaches the client byte for byte with the upstream's headers; a client
    that hangs up mid-stream closes the upstream connection at once (even while the upstream is
    silent) and frees the router's slot."""
    import socket

    from tusk.router.app import Router, _bind, build_server

    from tusk.config import ModelRoute, RouterConfig, WorkerEndpoint

    upstream_closed = asyncio.Event()
    metrics = b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(h.split(b":")[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                if head.startswith(b"GET /metrics"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(metrics) + metrics)
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n"
                    b"x-request-id: up-1\r\n\r\n"
                )
                writer.write(b"a\r\ndata: one\n\r\n")
                if b"hang" not in body:
                    writer.write(b"a\r\ndata: two\n\r\n0\r\n\r\n")
                    continue
                await reader.read()  # silent until the router closes the connection
                upstream_closed.set()
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server, address = await _server(handler)
    route = ModelRoute(
        name="tiny", tokenizer=str(tiny_model), workers=[WorkerEndpoint(address=address, protocol="http")]
    )
    router = Router(RouterConfig(port=0, models=[route]))
    sock = _bind("127.0.0.1", 0)
    http = build_server(router, drain_timeout=1)
    await router.start()
    task = asyncio.get_running_loop().create_task(http.serve(sockets=[sock]))
    port = sock.getsockname()[1]
    try:
        while not http.started or not router.registry.get("tiny").http.has_ready():
            await asyncio.sleep(0.02)

        async def post(content: str) -> tuple[asyncio.StreamReader, socket.socket]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b'{"model":"tiny","stream":true,"prompt":"%s"}' % content.encode()
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body) + body
            )
            return reader, writer

        reader, writer = await post("all")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head
        assert b"x-request-id: up-1" in head and b"transfer-encoding: chunked" in head
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 30)
        payload, rest = b"", raw
        while rest != b"0\r\n\r\n":
            size, _, rest = rest.partition(b"\r\n")
            payload, rest = payload + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        assert payload == b"data: one\ndata: two\n"
        writer.close()

        reader, writer = await post("hang")
        await asyncio.wait_for(reader.readuntil(b"data: one\n"), 30)
        assert router.api.inflight == 1
        writer.close()  # the client hangs up while the upstream is silent
        await asyncio.wait_for(upstream_closed.wait(), 30)
        for _ in range(500):
            if router.api.inflight == 0:
                break
            await asyncio.sleep(0.02)
        assert router.api.inflight == 0
    finally:
        http.should_exit = True
        await task
        await router.stop()
        server.close()


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
async def test_chunked_bodies_cut_anywhere_and_joined_when_they_arrive_together(cut: int) -> None:
    """De-chunking is exact however the bytes are cut by the network (``cut`` bytes per write),
    trailers included; chunks that are already there come out as one piece."""
    events = [b"data: %d\n\n" % i for i in range(12)]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\nx-trailer: 1\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                        b":"
                    )[1]
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(0, len(wire), cut):
                    writer.write(wire[i : i + cut])
                    await writer.drain()
                    if cut < 1000:
                        await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server, address = await _server(handler)
    pool = UpstreamPool(address)
    try:
        for _ in range(2):  # the connection is reused after a complete body
            response = await pool.post("/x", b"{}")
            pieces = [p async for p in response.chunks()]
            assert b"".join(pieces) == b"".join(events)
            if cut == 1000:
                assert len(pieces) == 1  # one write upstream, one piece downstream
        assert len(pool._idle) == 1
    finally:
        pool.close()
        server.close()


async def test_malformed_chunks_are_upstream_errors() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n")
        await writer.drain()

    server, address = await _server(handler)
    pool = UpstreamPool(address)
    try:
        response = await pool.post("/x", b"")
        with pytest.raises(UpstreamError):
            await response.read()
        assert not pool._idle
    finally:
        pool.close()
        server.close()

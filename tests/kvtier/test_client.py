"""KVTierClient against a real Valkey server: round trips, misses, corruption, faults, bounds."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import time

import pytest
import redis
import torch
from kvtier_helpers import TINY_BLOCK, fingerprint, metric, random_block

from tusk.kvformat import HEADER_FIXED_BYTES, encode_block
from tusk.kvserver import start_server
from tusk.kvtier.client import BlockData, KVTierClient, new_value_buffer, seal_value

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_block(tensor: torch.Tensor, dtype_name: str) -> BlockData:
    raw = tensor.contiguous().view(torch.uint8).numpy()
    return BlockData(dtype_name, tuple(tensor.shape), memoryview(raw))


def as_tensor(payload: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(shape)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [TINY_BLOCK, (2, 2, 8, 4, 16), (1, 2, 1, 1, 8)])
async def test_blocks_round_trip(kv_server, dtype_name, shape):
    fp = fingerprint(dtype_name, shape)
    tensors = [random_block(DTYPES[dtype_name], shape, seed) for seed in range(3)]
    hashes = [11, 22, 33]
    async with KVTierClient(kv_server.url, fp, block_shape=shape) as client:
        assert await client.put_blocks(hashes, [as_block(t, dtype_name) for t in tensors]) == 3
        results = await client.get_blocks([*hashes, 44])
        assert results[3] is None
        for tensor, result in zip(tensors, results[:3], strict=True):
            header, payload = result
            assert header.dtype == dtype_name and header.shape == shape
            assert torch.equal(as_tensor(payload, DTYPES[dtype_name], shape), tensor)
        assert await client.contains([44, 22, 11, 55]) == [False, True, True, False]


async def test_preallocated_value_is_sent_without_copy(kv_server, fp):
    """The zero-copy write path: fill the payload in place, seal, send the buffer itself."""
    tensor = random_block(torch.float32, TINY_BLOCK, 7)
    buf, payload = new_value_buffer("float32", TINY_BLOCK)
    torch.frombuffer(payload, dtype=torch.float32).view(TINY_BLOCK).copy_(tensor)
    value = seal_value(buf, "float32", TINY_BLOCK)
    assert value.obj is buf
    async with KVTierClient(kv_server.url, fp) as client:
        assert await client.put_values([5], [value]) == 1
        [(header, got)] = await client.get_blocks([5])
    assert bytes(got) == tensor.numpy().tobytes()


async def test_fingerprint_mismatch_is_a_miss(kv_server):
    block = as_block(random_block(torch.float32, TINY_BLOCK, 1), "float32")
    async with (
        KVTierClient(kv_server.url, fingerprint(model="a")) as writer,
        KVTierClient(kv_server.url, fingerprint(model="b")) as other_model,
        KVTierClient(kv_server.url, fingerprint("float16")) as other_dtype,
    ):
        assert await writer.put_blocks([1], [block]) == 1
        assert await other_model.get_blocks([1]) == [None]
        assert await other_dtype.get_blocks([1]) == [None]
        assert await other_model.contains([1]) == [False]
        assert (await writer.get_blocks([1]))[0] is not None


async def test_wrong_shape_under_right_key_is_a_miss(kv_server, fp):
    """Defence in depth: a value whose header disagrees with the fingerprint is not used."""
    async with KVTierClient(kv_server.url, fp, block_shape=TINY_BLOCK) as client:
        raw = redis.Redis.from_url(kv_server.url)
        odd = torch.zeros(8, dtype=torch.float32).numpy().tobytes()
        raw.set(client.key(9), encode_block("float32", (8,), odd))
        before = metric("tusk_kvtier_misses_total", reason="mismatch")
        assert await client.get_blocks([9]) == [None]
        assert metric("tusk_kvtier_misses_total", reason="mismatch") == before + 1
        raw.close()


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage"])
async def test_corrupt_value_is_a_miss_and_counted(kv_server, fp, damage):
    block = as_block(random_block(torch.float32, TINY_BLOCK, 3), "float32")
    async with KVTierClient(kv_server.url, fp) as client:
        await client.put_blocks([1, 2], [block, block])
        raw = redis.Redis.from_url(kv_server.url)
        key = client.key(1)
        if damage == "flip_payload":
            offset = HEADER_FIXED_BYTES + 4 * len(TINY_BLOCK) + 100
            byte = raw.getrange(key, offset, offset)
            raw.setrange(key, offset, bytes([byte[0] ^ 0xFF]))
        elif damage == "truncate":
            raw.set(key, raw.getrange(key, 0, 1000))
        else:
            raw.set(key, b"not a block at all")
        raw.close()
        before = metric("tusk_kvtier_corrupt_blocks_total")
        results = await client.get_blocks([1, 2])
        assert results[0] is None and results[1] is not None
        assert metric("tusk_kvtier_corrupt_blocks_total") == before + 1


async def test_server_killed_calls_degrade_fast_then_reconnect_after_restart(fp):
    server = start_server(maxmemory="64mb")
    port = server.port
    block = as_block(random_block(torch.float32, TINY_BLOCK, 4), "float32")
    client = KVTierClient(server.url, fp, timeout_s=1.0, breaker_max_s=0.2)
    try:
        assert await client.put_blocks([1], [block]) == 1
        server.kill()
        errors_before = metric("tusk_kvtier_errors_total", op="get")
        started = time.monotonic()
        for _ in range(20):
            assert await client.get_blocks([1, 2]) == [None, None]
            assert await client.put_blocks([3], [block]) == 0
            assert await client.contains([1]) == [False]
        assert time.monotonic() - started < 2.0
        assert metric("tusk_kvtier_errors_total", op="get") > errors_before

        server.stop()
        server = start_server(port=port, maxmemory="64mb")
        deadline = time.monotonic() + 5
        while await client.put_blocks([1], [block]) != 1:
            assert time.monotonic() < deadline, "client did not reconnect to the restarted server"
            await asyncio.sleep(0.05)
        assert (await client.get_blocks([1]))[0] is not None
    finally:
        await client.close()
        server.stop()


async def test_stalled_server_is_a_timeout_miss_not_a_hang(kv_server, fp):
    block = as_block(random_block(torch.float32, TINY_BLOCK, 5), "float32")
    async with KVTierClient(kv_server.url, fp, timeout_s=0.3, breaker_max_s=0.1) as client:
        assert await client.put_blocks([1], [block]) == 1
        os.kill(kv_server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert await client.get_blocks([1]) == [None]
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(kv_server.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while (await client.get_blocks([1]))[0] is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_background_writes_are_bounded(kv_server, fp):
    block = as_block(random_block(torch.float32, TINY_BLOCK, 6), "float32")
    value = bytes(memoryview(encode_block(block.dtype, block.shape, block.data)))
    async with KVTierClient(kv_server.url, fp, max_inflight_bytes=3 * len(value)) as client:
        before = metric("tusk_kvtier_dropped_writes_total", reason="inflight_full")
        first = client.write_behind([1, 2], [value, value])
        second = client.write_behind([3, 4], [value, value])  # would be 4 values in flight
        assert first is not None and second is None
        assert client.inflight_bytes == 2 * len(value)
        assert metric("tusk_kvtier_dropped_writes_total", reason="inflight_full") == before + 2
        assert await first == 2
        assert client.inflight_bytes == 0
        assert client.write_behind([3], [value]) is not None
        await client.drain()
        assert await client.contains([1, 2, 3, 4]) == [True, True, True, False]


async def test_auth_url(fp):
    server = start_server(maxmemory="64mb", password="s3cret/pw")
    try:
        block = as_block(random_block(torch.float32, TINY_BLOCK, 8), "float32")
        async with KVTierClient(server.url, fp) as client:
            assert "s3cret" in server.url
            assert await client.put_blocks([1], [block]) == 1
            assert (await client.get_blocks([1]))[0] is not None
        anonymous = f"redis://{server.host}:{server.port}/0"
        async with KVTierClient(anonymous, fp) as client:
            assert await client.get_blocks([1]) == [None]
            assert await client.put_blocks([1], [block]) == 0
    finally:
        server.stop()


async def test_tls_url_against_plain_server_is_a_miss_not_an_error(kv_server, fp):
    """rediss:// goes through redis-py's TLS path; a failed handshake is a miss like any fault."""
    url = kv_server.url.replace("redis://", "rediss://") + "?ssl_cert_reqs=none"
    async with KVTierClient(url, fp, timeout_s=0.5) as client:
        assert await client.get_blocks([1]) == [None]
        assert await client.contains([1]) == [False]


async def test_bad_arguments_are_clear_errors(kv_server, fp):
    with pytest.raises(ValueError, match="timeout_s"):
        KVTierClient(kv_server.url, fp, timeout_s=0)
    async with KVTierClient(kv_server.url, fp) as client:
        with pytest.raises(ValueError, match="2 hashes but 1 values"):
            await client.put_values([1, 2], [b"x"])
        assert await client.get_blocks([]) == []
        assert await client.contains([]) == []


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
async def test_tls_url_through_a_tls_terminating_proxy(kv_server, fp, tmp_path):
    """rediss:// with a CA file: real TLS from the client to a proxy that forwards to the server.

    (The embedded Valkey is built without TLS, so TLS ends in front of it, as with stunnel or a
    cloud provider's TLS endpoint.)
    """
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def forward(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(kv_server.host, kv_server.port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    proxy = await asyncio.start_server(forward, "127.0.0.1", 0, ssl=context)
    port = proxy.sockets[0].getsockname()[1]
    block = as_block(random_block(torch.float32, TINY_BLOCK, 9), "float32")
    try:
        async with KVTierClient(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", fp) as client:
            assert await client.put_blocks([1], [block]) == 1
            [(header, payload)] = await client.get_blocks([1])
            assert bytes(payload) == bytes(block.data)
        # Without trusting the certificate the handshake fails: a miss, not an exception.
        async with KVTierClient(f"rediss://127.0.0.1:{port}/0", fp, timeout_s=0.5) as client:
            assert await client.get_blocks([1]) == [None]
    finally:
        proxy.close()


async def test_hit_and_miss_metrics(kv_server, fp):
    block = as_block(random_block(torch.float32, TINY_BLOCK, 10), "float32")
    async with KVTierClient(kv_server.url, fp) as client:
        await client.put_blocks([1, 2], [block, block])
        hits, absent = metric("tusk_kvtier_hits_total"), metric("tusk_kvtier_misses_total", reason="absent")
        got_bytes = metric("tusk_kvtier_get_bytes_total")
        await client.get_blocks([1, 2, 3])
        assert metric("tusk_kvtier_hits_total") == hits + 2
        assert metric("tusk_kvtier_misses_total", reason="absent") == absent + 1
        assert metric("tusk_kvtier_get_bytes_total") > got_bytes + 2 * len(bytes(block.data))


async def test_digest_only_client_answers_contains(kv_server, fp):
    """The router knows a worker's fingerprint only as the digest from its Health reply."""
    block = as_block(random_block(torch.float32, TINY_BLOCK, 11), "float32")
    async with KVTierClient(kv_server.url, fp) as worker, KVTierClient(kv_server.url, fp.digest()) as router:
        await worker.put_blocks([1], [block])
        assert await router.contains([1, 2]) == [True, False]
        assert (await router.get_blocks([1]))[0] is not None

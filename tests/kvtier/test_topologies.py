"""Past one node: the tier client through Redis Sentinel and against a (one-node) Redis Cluster."""

from __future__ import annotations

import subprocess
import time

import pytest
import redis
import torch
from kvtier_helpers import TINY_BLOCK, random_block

from tusk.kvformat import encode_block
from tusk.kvserver import find_server_binary, free_port, start_server
from tusk.kvtier.client import KVTierClient
from tusk.kvtier.connect import parse_tier_url


def value(seed: int) -> bytes:
    return encode_block(
        "float32", TINY_BLOCK, random_block(torch.float32, TINY_BLOCK, seed).numpy().tobytes()
    )


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.05)


@pytest.fixture
def sentinel(kv_server, tmp_path):
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor tier {kv_server.host} {kv_server.port} 1\n"
    )
    log = open(tmp_path / "sentinel.log", "wb")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen([find_server_binary(), str(conf), "--sentinel"], stdout=log, stderr=log)
    log.close()
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        wait_for(lambda: client.sentinel_get_master_addr_by_name("tier") is not None)
        yield port
    finally:
        client.close()
        process.kill()
        process.wait()


async def test_sentinel_url(sentinel, fp):
    url = f"redis://127.0.0.1:{sentinel}/0?sentinel_master=tier"
    async with KVTierClient(url, fp) as client:
        assert await client.put_values([1, 2], [value(1), value(2)]) == 2
        got = await client.get_blocks([1, 2, 3])
        assert got[0] is not None and got[1] is not None and got[2] is None
        assert await client.contains([2, 3]) == [True, False]


async def test_cluster_url(fp):
    # An explicit bus port: the default (port + 10000) does not exist for ports above 55535.
    bus = ["--cluster-port", str(free_port())]
    server = start_server(maxmemory="64mb", extra_args=["--cluster-enabled", "yes", *bus])
    try:
        admin = redis.Redis(host=server.host, port=server.port)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        wait_for(lambda: b"cluster_state:ok" in admin.execute_command("CLUSTER", "INFO"))
        admin.close()
        url = f"redis://{server.host}:{server.port}/0?cluster=true"
        async with KVTierClient(url, fp) as client:
            hashes = list(range(1, 41))  # many slots
            assert await client.put_values(hashes, [value(h) for h in hashes]) == 40
            got = await client.get_blocks([*hashes, 99])
            assert all(g is not None for g in got[:40]) and got[40] is None
            assert await client.contains([5, 99]) == [True, False]
            server.kill()
            assert await client.get_blocks([1]) == [None]  # a dead cluster is a miss too
    finally:
        server.stop()


def test_tier_url_parameters():
    assert parse_tier_url("redis://h:1/0?sentinel_master=m&sentinel_password=p&x=1") == (
        "redis://h:1/0?x=1",
        "m",
        "p",
        False,
    )
    assert parse_tier_url("rediss://h:1/0?cluster=true")[3] is True
    with pytest.raises(ValueError, match="both"):
        parse_tier_url("redis://h:1/0?cluster=1&sentinel_master=m")

"""One place that turns a tier URL into a redis-py asyncio client: one node, Sentinel or Cluster.

``KVTierConfig`` accepts ``redis://``, ``rediss://``, ``unix://`` (and ``valkey[s]://``) URLs, so
the ways past one node are query parameters of such a URL rather than new schemes:

* ``redis://[:password@]sentinel1:26379,sentinel2:26379/0?sentinel_master=NAME`` asks the
  Sentinels for the current master of ``NAME`` and follows failovers; the password (if any) is
  the master's, ``sentinel_password=...`` the Sentinels' own.
* ``redis://[:password@]node:6379/0?cluster=true`` talks to a Redis Cluster; block keys carry no
  hash tag, so blocks spread over every node's slots and a batched get is split per node.
* anything else goes to ``redis.asyncio.Redis.from_url`` unchanged (TLS parameters such as
  ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` included).

Client-side retries are off everywhere: the caller treats a failure as a miss, and a retry would
only double what a dead server costs.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

_TRUE = {"1", "true", "yes", "on"}


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def parse_tier_url(url: str) -> tuple[str, str | None, str | None, bool]:
    """``(url without tusk's parameters, sentinel master, sentinel password, cluster)``."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    master = query.pop("sentinel_master", [None])[-1] or None
    sentinel_password = query.pop("sentinel_password", [None])[-1] or None
    cluster = query.pop("cluster", ["false"])[-1].lower() in _TRUE
    if master and cluster:
        raise ValueError("a KV tier URL cannot ask for both sentinel_master and cluster")
    clean = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    return clean, master, sentinel_password, cluster


def connect(url: str, *, timeout_s: float, max_connections: int = 16):
    """A redis.asyncio client (``Redis`` or ``RedisCluster``) for a tier URL; raises ValueError."""
    clean, master, sentinel_password, cluster = parse_tier_url(url)
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return RedisCluster.from_url(clean, retry=_no_retry(), max_connections=max_connections, **timeouts)
    if master:
        parts = urlsplit(clean)
        hosts = parts.netloc.rpartition("@")[2]
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.rpartition(":")
            if not host:
                raise ValueError(f"sentinel address {item!r} in {url!r} needs host:port")
            sentinels.append((host.strip("[]"), int(port)))
        db = int(parts.path.strip("/") or 0)
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={**timeouts, "password": sentinel_password},
            **timeouts,
        )
        return sentinel.master_for(
            master,
            db=db,
            password=password,
            username=username,
            retry=_no_retry(),
            max_connections=max_connections,
            ssl=parts.scheme in ("rediss", "valkeys"),
        )
    return aioredis.Redis.from_url(
        clean, retry=_no_retry(), max_connections=max_connections, health_check_interval=0, **timeouts
    )


def is_cluster(url: str) -> bool:
    return parse_tier_url(url)[3]

"""Prometheus metrics of the KV tier and the host cache.

Defined once per process (the prometheus convention): several clients in one process, such as a
prefill and a decode engine in a test, add to the same series. Tier faults never reach callers as
exceptions, so these counters are how an operator sees that the tier is down, slow or corrupt.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TIER_HITS = Counter("tusk_kvtier_hits_total", "Blocks found intact in the KV tier")
TIER_MISSES = Counter(
    "tusk_kvtier_misses_total",
    "Blocks asked of the KV tier and not served, by reason",
    ["reason"],  # absent, corrupt, mismatch, error, unavailable
)
CORRUPT_BLOCKS = Counter(
    "tusk_kvtier_corrupt_blocks_total", "Tier values that failed header or checksum validation"
)
TIER_ERRORS = Counter(
    "tusk_kvtier_errors_total",
    "Tier operations that failed (connection, timeout, server error), by operation",
    ["op"],
)
PUT_BLOCKS = Counter("tusk_kvtier_put_blocks_total", "Blocks written to the KV tier")
PUT_BYTES = Counter("tusk_kvtier_put_bytes_total", "Bytes written to the KV tier")
GET_BYTES = Counter("tusk_kvtier_get_bytes_total", "Bytes read from the KV tier")
DROPPED_WRITES = Counter(
    "tusk_kvtier_dropped_writes_total",
    "Blocks whose background write was dropped, by reason",
    ["reason"],  # inflight_full, error, unavailable
)
INFLIGHT_BYTES = Gauge("tusk_kvtier_inflight_write_bytes", "Bytes of queued background tier writes")
OP_SECONDS = Histogram(
    "tusk_kvtier_op_seconds",
    "Latency of one batched tier operation",
    ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HOST_HITS = Counter("tusk_kvtier_host_hits_total", "Blocks served from the worker's host cache")
HOST_BLOCKS = Gauge("tusk_kvtier_host_blocks", "Blocks held in the worker's host cache")
HOST_BYTES = Gauge("tusk_kvtier_host_bytes", "Bytes held in the worker's host cache")
HOST_EVICTIONS = Counter("tusk_kvtier_host_evictions_total", "Blocks evicted from the host cache")

ALL = (
    TIER_HITS,
    TIER_MISSES,
    CORRUPT_BLOCKS,
    TIER_ERRORS,
    PUT_BLOCKS,
    PUT_BYTES,
    GET_BYTES,
    DROPPED_WRITES,
    INFLIGHT_BYTES,
    OP_SECONDS,
    HOST_HITS,
    HOST_BLOCKS,
    HOST_BYTES,
    HOST_EVICTIONS,
)


def register(registry: CollectorRegistry) -> None:
    """Also expose the tier's metrics on ``registry`` (e.g. a worker's own /metrics registry).

    The metrics live in the default registry; a collector may belong to several registries, so
    this adds them without moving them. Registering twice is harmless.
    """
    for collector in ALL:
        try:
            registry.register(collector)
        except ValueError:  # already registered there
            pass

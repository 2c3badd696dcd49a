"""Every metric the Grafana dashboard queries is one that tusk really exports."""

from __future__ import annotations

import json
import re

from chartkit import CHART
from prometheus_client import REGISTRY
from tusk.router.metrics import RouterMetrics

import tusk.kvtier.metrics  # noqa: F401 - registers the tier metrics in the default registry

DASHBOARD = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count"),
}


def _exported_names() -> set[str]:
    names = set()
    for registry in (RouterMetrics().registry, REGISTRY):
        for family in registry.collect():
            if family.name.startswith("tusk_"):
                names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def _queried_names() -> set[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in DASHBOARD["templating"]["list"] if "definition" in v]
    return {m for e in exprs for m in re.findall(r"\btusk_[a-z0-9_]+", e)}


def test_dashboard_queries_only_exported_metrics():
    queried = _queried_names()
    assert len(queried) >= 10
    missing = queried - _exported_names()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"


def test_dashboard_covers_latency_load_queue_and_the_kv_tier():
    queried = _queried_names()
    for needed in (
        "tusk_router_ttft_seconds_bucket",
        "tusk_router_inter_token_latency_seconds_bucket",
        "tusk_router_requests_total",
        "tusk_router_inflight_requests",
        "tusk_router_worker_running_requests",
        "tusk_kvtier_hits_total",
    ):
        assert needed in queried


def test_panels_have_unique_ids_and_use_the_datasource_variable():
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]

"""Shared configuration models and the generated protocol."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tusk.config import KVTierConfig, ModelRoute, RouterConfig, ServeConfig, WorkerConfig


def test_worker_config_round_trips_through_json():
    cfg = WorkerConfig(model="/m", role="prefill", kv_tier={"url": "redis://h:6379/0"})
    assert WorkerConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="extra"):
        WorkerConfig(model="/m", rolee="prefill")


def test_kv_tier_url_scheme_is_checked():
    assert KVTierConfig(url="rediss://user:pw@h:6380/1").url
    with pytest.raises(ValidationError, match="redis://"):
        KVTierConfig(url="http://h")


def test_router_model_names_unique():
    route = ModelRoute(name="m", tokenizer="/t")
    with pytest.raises(ValidationError, match="unique"):
        RouterConfig(models=[route, route])


def test_serve_needs_a_decode_worker():
    with pytest.raises(ValidationError):
        ServeConfig(decode=0)
    assert ServeConfig(prefill=0).prefill == 0


def test_protocol_messages_are_generated():
    from tusk.protocol import pb, rpc

    req = pb.GenerateRequest(
        request_id="r", prompt_token_ids=[1, 2], sampling=pb.SamplingParams(max_tokens=4)
    )
    assert pb.GenerateRequest.FromString(req.SerializeToString()) == req
    assert not req.HasField("first_token")
    assert hasattr(rpc, "WorkerStub") and hasattr(rpc, "add_WorkerServicer_to_server")
    assert pb.PrefillResponse(block_hashes=[2**64 - 1]).block_hashes[0] == 2**64 - 1


async def test_routing_is_chosen_per_model(tiny_model):
    from tusk.router.discovery import StaticDiscovery
    from tusk.router.metrics import RouterMetrics
    from tusk.router.registry import ModelRegistry

    from tusk.config import RoutingConfig

    config = RouterConfig(
        models=[
            ModelRoute(name="a", tokenizer=str(tiny_model)),
            ModelRoute(name="b", tokenizer=str(tiny_model), routing=RoutingConfig(policy="round_robin")),
        ],
        routing=RoutingConfig(policy="cache_aware"),
    )
    registry = ModelRegistry()
    await StaticDiscovery(config, registry, RouterMetrics()).start()
    assert registry.get("a").default_policy.name == "cache_aware"
    assert registry.get("b").default_policy.name == "round_robin"

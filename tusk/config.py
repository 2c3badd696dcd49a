"""Configuration models shared by the CLI, the router, the workers and the operator.

One pydantic model per process kind. The operator renders these into a ConfigMap, ``tusk serve``
builds them from flags, and each process validates what it receives before starting, so a bad
setting fails at the edge with a readable message instead of deep inside the engine.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class KVTierConfig(_Strict):
    """Where the shared KV tier lives and how the worker uses it."""

    url: str | None = Field(None, description="redis://, rediss:// or unix:// URL; None disables the tier")
    host_cache_blocks: int = Field(256, ge=0, description="blocks kept in the worker's host (CPU) LRU cache")
    write_through: bool = Field(True, description="prefill workers write new full blocks to the tier")
    timeout_s: float = Field(2.0, gt=0, description="per-operation timeout; a timeout is a miss")
    max_inflight_bytes: int = Field(256 << 20, gt=0, description="bound on queued background writes")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(
            ("redis://", "rediss://", "unix://", "valkey://", "valkeys://")
        ):
            raise ValueError(f"KV tier URL must start with redis://, rediss:// or unix://, got {url!r}")
        return url


class EngineConfig(_Strict):
    """Knobs of the inference engine inside a worker."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, xpu, mps ...")
    block_size: int = Field(16, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=1, description="KV cache size; None = from memory")
    kv_cache_memory_fraction: float = Field(0.85, gt=0, le=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    kernel_backend: str | None = Field(None, description="force a tusk.kernels backend (torch, triton)")
    torch_compile: bool = Field(False, description="torch.compile the MLPs (CPU; first steps compile)")
    seed: int = 0

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> EngineConfig:
        # vLLM's SchedulerConfig check: a step budget below the sequence cap starves running
        # decodes (each needs one token of budget every step).
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs one token of budget per step"
            )
        return self


class WorkerConfig(_Strict):
    model: str = Field(..., description="local folder, or hf://org/name")
    served_model_name: str | None = None
    role: Role = Role.BOTH
    worker_id: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    http_port: int | None = Field(
        None, ge=0, le=65535, description="OpenAI-compatible HTTP API port (0 = any free port); None = off"
    )
    engine: EngineConfig = EngineConfig()
    kv_tier: KVTierConfig = KVTierConfig()
    drain_timeout_s: float = Field(30.0, ge=0)


class WorkerEndpoint(_Strict):
    address: str = Field(..., description="host:port of the worker's gRPC server")
    role: Role = Role.BOTH
    protocol: Literal["grpc", "http"] = Field(
        "grpc", description="grpc: a tusk worker; http: an OpenAI-compatible server (vLLM, SGLang)"
    )
    kv_events: str | None = Field(None, description="http backends: ZMQ PUB endpoint of KV events")
    kv_events_replay: str | None = Field(None, description="http backends: ZMQ ROUTER replay endpoint")


class AdmissionConfig(_Strict):
    """The router's per-model admission queue (``tusk.router.admission``): requests wait at the
    router while every worker has more than ``backlog_s`` of prefill queued, and the one with
    the least prefill work left goes first, each second of waiting counting ``aging`` seconds
    of work."""

    backlog_s: float = Field(
        0.2,
        ge=0,
        le=3600,
        description="hold requests while every worker has this much prefill queued (0: off)",
    )
    aging: float = Field(
        0.05, gt=0, le=1000, description="seconds of work a request's rank gains per second it waits"
    )
    max_waiting: int = Field(4096, ge=1, le=1_000_000, description="more waiting requests get HTTP 429")


class RoutingConfig(_Strict):
    policy: str = "cost"
    disaggregation_threshold_tokens: int | None = Field(
        None, ge=0, description="fixed override; None = tuned online"
    )
    kv_events: bool = True
    settings: dict[str, Any] = Field(
        default_factory=dict, description="policy settings (tusk.router.policies.SETTING_NAMES)"
    )
    allow_policy_header: bool = Field(False, description="let clients pick a policy with x-tusk-policy")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)

    @model_validator(mode="after")
    def _known_policy_and_settings(self) -> RoutingConfig:
        """An unknown policy, setting or scorer, or a bad value, fails here, at start."""
        if self.policy == "cost" and not self.settings and self.disaggregation_threshold_tokens is None:
            return self  # the defaults (also built while this module is still importing)
        from tusk.router.policies import make_policy
        from tusk.router.prefix_index import PrefixIndex

        settings = dict(self.settings)
        if self.disaggregation_threshold_tokens is not None:
            settings["disaggregation_threshold_tokens"] = self.disaggregation_threshold_tokens
        make_policy(self.policy, PrefixIndex(max_blocks_per_worker=1), **settings)
        return self


class ModelRoute(_Strict):
    """One model the router serves, and how to reach its workers."""

    name: str
    tokenizer: str = Field(..., description="folder holding tokenizer.json / tokenizer_config.json")
    block_size: int = Field(16, ge=1)
    max_model_len: int | None = None
    workers: list[WorkerEndpoint] = []
    kubernetes_selector: str | None = Field(
        None, description="label selector for pods/EndpointSlices when discovering in a cluster"
    )
    routing: RoutingConfig | None = Field(
        None, description="this model's routing; None = the router's default"
    )


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[ModelRoute] = []
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    max_queue: int = Field(1024, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    api_keys: list[str] = []

    @model_validator(mode="after")
    def _unique_model_names(self) -> RouterConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {dupes}")
        return self


class EndpointPickerConfig(_Strict):
    """``tusk epp``: a Gateway API Inference Extension endpoint picker (Envoy ext_proc) over
    OpenAI-compatible model servers; ``models[].workers`` are their HTTP ``ip:port``."""

    host: str = "127.0.0.1"
    port: int = Field(9002, ge=0, le=65535, description="ext_proc and gRPC health (0 = any free port)")
    models: list[ModelRoute] = []
    routing: RoutingConfig = RoutingConfig(kv_events=False)
    fallbacks: int = Field(0, ge=0, le=16, description="fallback endpoints after the primary")
    shed_queue_depth: int | None = Field(
        None, ge=1, description="answer 429 when every eligible server has this many queued"
    )
    max_body_bytes: int = Field(4 << 20, ge=1024)
    poll_interval_s: float = Field(0.5, gt=0, description="how often servers' /metrics are read")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")


class ServeConfig(_Strict):
    """What ``tusk serve`` was asked for."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    prefill: Annotated[int, Field(ge=0, le=64)] = 1
    decode: Annotated[int, Field(ge=1, le=64)] = 1
    kv_tier: str | None = None
    kv_tier_maxmemory: str = "512mb"
    engine: EngineConfig = EngineConfig()
    gateway: Literal["envoy"] | None = None
    gateway_port: Annotated[int, Field(ge=0, le=65535)] = 0

"""A typed view of a ModelDeployment's spec, with the CRD's defaults.

The API server applies the CRD defaults, but the operator must not depend on that (old objects,
emulators, a CRD upgraded under existing objects), so the same defaults live here and a spec that
the schema would accept always parses. Field names follow the CRD (camelCase aliases).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tusk.operator import schema

Accelerator = Literal["nvidia", "amd", "intel", "cpu"]


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class SecretRef(_Spec):
    name: str = Field(min_length=1)
    key: str = "token"


class CacheSpec(_Spec):
    """Where hf:// downloads go: a size-limited emptyDir, or a shared PVC when one is named."""

    size_limit: int | str = Field("20Gi", alias="sizeLimit")
    persistent_volume_claim: str | None = Field(None, alias="persistentVolumeClaim")


class ModelSource(_Spec):
    source: str = Field(pattern=schema.MODEL_SOURCE_PATTERN)
    token_secret_ref: SecretRef | None = Field(None, alias="tokenSecretRef")
    image_path: str = Field("/model", alias="imagePath")
    cache: CacheSpec = CacheSpec()

    @property
    def kind(self) -> Literal["tiny", "hf", "pvc", "image", "path"]:
        for prefix, kind in (("hf://", "hf"), ("pvc://", "pvc"), ("image://", "image")):
            if self.source.startswith(prefix):
                return kind  # type: ignore[return-value]
        return "tiny" if self.source == "tiny" else "path"

    @model_validator(mode="after")
    def _token_only_for_hf(self) -> ModelSource:
        if self.token_secret_ref is not None and self.kind != "hf":
            raise ValueError("model.tokenSecretRef is only used with hf:// sources")
        return self


class Resources(_Spec):
    limits: dict[str, int | str] = {}
    requests: dict[str, int | str] = {}


class RolloutSpec(_Spec):
    """Deployment rolling-update bounds; maxSurge 0 by default so a rollout needs no spare GPU."""

    max_surge: int | str = Field(0, alias="maxSurge")
    max_unavailable: int | str = Field(1, alias="maxUnavailable")


class RoleSpec(_Spec):
    replicas: int = 1
    accelerator: Accelerator = "cpu"
    accelerators_per_replica: int = Field(1, ge=1, le=1, alias="acceleratorsPerReplica")
    resources: Resources = Resources()
    node_selector: dict[str, str] = Field({}, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] | None = None
    env: list[dict[str, Any]] = []
    image: str | None = None
    image_pull_secrets: list[dict[str, Any]] = Field([], alias="imagePullSecrets")
    service_account_name: str | None = Field(None, alias="serviceAccountName")
    priority_class_name: str | None = Field(None, alias="priorityClassName")
    runtime_class_name: str | None = Field(None, alias="runtimeClassName")
    topology_spread_constraints: list[dict[str, Any]] = Field([], alias="topologySpreadConstraints")
    volumes: list[dict[str, Any]] = []
    volume_mounts: list[dict[str, Any]] = Field([], alias="volumeMounts")
    pod_template: dict[str, Any] = Field({}, alias="podTemplate")
    rollout: RolloutSpec = RolloutSpec()


class EngineSpec(_Spec):
    max_num_seqs: int | None = Field(None, ge=1, alias="maxNumSeqs")
    max_num_batched_tokens: int | None = Field(None, ge=1, alias="maxNumBatchedTokens")
    kv_cache_memory_fraction: float | None = Field(None, gt=0, le=1, alias="kvCacheMemoryFraction")
    kernel_backend: str | None = Field(None, alias="kernelBackend")


class ManagedTier(_Spec):
    replicas: int = Field(1, ge=0, le=1)
    memory: int | str = "1Gi"
    maxmemory_policy: str = Field("allkeys-lru", alias="maxmemoryPolicy")
    image: str = "valkey/valkey:8.1.4"


class PasswordRef(SecretRef):
    key: str = "password"


class ExternalTier(_Spec):
    url: str = Field(pattern=r"^(redis|rediss|valkey|valkeys|unix)://\S+$")
    secret_ref: PasswordRef | None = Field(None, alias="secretRef")


class KVTierSpec(_Spec):
    managed: ManagedTier | None = None
    external: ExternalTier | None = None

    @model_validator(mode="after")
    def _one_of(self) -> KVTierSpec:
        if self.managed is not None and self.external is not None:
            raise ValueError("kvTier: set either external (url) or managed, not both")
        return self


class RoutingSpec(_Spec):
    policy: str = "cost"
    disaggregation_threshold: int | None = Field(None, ge=0, alias="disaggregationThreshold")


class ModelDeploymentSpec(_Spec):
    model: ModelSource
    served_model_names: list[str] = Field([], alias="servedModelNames")
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(None, ge=1, alias="maxModelLen")
    block_size: int = Field(16, ge=1, le=1024, alias="blockSize")
    image: str | None = None
    engine: EngineSpec = EngineSpec()
    prefill: RoleSpec = RoleSpec(replicas=0)
    decode: RoleSpec = RoleSpec(replicas=1)
    kv_tier: KVTierSpec = Field(KVTierSpec(managed=ManagedTier()), alias="kvTier")
    routing: RoutingSpec = RoutingSpec()
    paused: bool = False

    @model_validator(mode="after")
    def _replicas(self) -> ModelDeploymentSpec:
        if self.decode.replicas < 0:
            raise ValueError("decode.replicas must be at least 0")
        if self.prefill.replicas < 0:
            raise ValueError("prefill.replicas must be at least 0")
        return self


_PATTERN_HELP = {
    "model.source": "use tiny, hf://ORG/NAME[@REVISION], pvc://CLAIM[/SUBPATH], image://IMAGE or /absolute/path",
    "kvTier.external.url": "use redis://, rediss://, valkey://, valkeys:// or unix://",
}


class InvalidSpec(ValueError):
    """A spec the operator cannot act on; the message is shown in the Degraded condition as is."""


def parse_spec(raw: dict[str, Any] | None) -> ModelDeploymentSpec:
    """Parse a spec (as stored in the API server) or raise InvalidSpec with a one-line reason."""
    raw = dict(raw or {})
    # An explicit prefill block without replicas means zero, as the CRD default says.
    if isinstance(raw.get("prefill"), dict):
        raw["prefill"] = {"replicas": 0, **raw["prefill"]}
    try:
        return ModelDeploymentSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "string_pattern_mismatch":
                message = f"{error['input']!r} is not valid: {_PATTERN_HELP.get(where, 'wrong format')}"
            problems.append(f"spec.{where}: {message}" if where else message)
        raise InvalidSpec("; ".join(problems)) from None

"""The ModelDeployment spec: its fields, defaults and constraints, defined once.

These pydantic models are the single definition of the spec. The operator parses stored objects
with them (it must not depend on the API server's defaulting: old objects, emulators, a CRD
upgraded under existing objects), and ``tusk.operator.schema`` generates the CRD's OpenAPI schema
from them, so a default or a bound cannot differ between the two. What only the CRD needs rides
along in ``json_schema_extra``: Kubernetes item schemas of pass-through lists, and CEL rules
(``x-kubernetes-validations``) whose Python twins are the model validators below.
Field names follow the CRD (camelCase aliases).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from tusk.router.policies import POLICY_NAMES, setting_types

from tusk.config import AdmissionConfig, EngineConfig, RoutingConfig
from tusk.kernel_backends import KERNEL_BACKENDS

ACCELERATORS = ("nvidia", "amd", "intel", "cpu")
DTYPES = ("auto", "float32", "float16", "bfloat16")
MAXMEMORY_POLICIES = (
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "noeviction",
)
Accelerator = Literal[ACCELERATORS]  # type: ignore[valid-type]
PolicyName = Literal[POLICY_NAMES]  # type: ignore[valid-type]
KernelBackend = Literal[KERNEL_BACKENDS]  # type: ignore[valid-type]

# Model sources: the embedded tiny model, a Hugging Face repo (or one GGUF file in it), a PVC,
# a model image, or a path in the image. A path or pvc:// path may name a .gguf file.
MODEL_SOURCE_PATTERN = (
    r"^(tiny"
    r"|hf://[^/@\s]+/[^/@\s]+(@[^\s]+)?"
    r"|hf://[^/@\s]+/[^/@\s]+/[^@\s]+\.gguf"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?"
    r"|image://\S+"
    r"|/\S*)$"
)
# The Kubernetes quantity syntax (resource.Quantity), without a sign: 512Mi, 2Gi, 500m, 1e3.
QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
REDIS_URL_PATTERN = r"^(redis|rediss|valkey|valkeys|unix)://\S+$"


def object_name_field(alias: str, description: str) -> Any:
    """An optional reference, by name, to another Kubernetes object (a DNS subdomain name)."""
    return Field(None, alias=alias, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description=description)


# Upper bounds that catch typos (an extra zero, a byte count where tokens were meant).
MAX_REPLICAS = 1000
MAX_TOKENS = 1 << 20
MAX_SEQS = 16384

CEL_FORBIDDEN = "FieldValueForbidden"
CEL_INVALID = "FieldValueInvalid"


def _int_or_string(pattern: str, what: str) -> Any:
    """An int-or-string field (a quantity, a surge count or percentage) checked as the CRD checks it."""

    def check(value: int | str) -> int | str:
        if isinstance(value, str) and not re.match(pattern, value):
            raise ValueError(f"{value!r} is not {what}")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{value} must not be negative")
        return value

    return Annotated[
        int | str,
        AfterValidator(check),
        # minimum applies to the integer form only, pattern to the string form.
        Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": pattern, "minimum": 0}),
    ]


Quantity = _int_or_string(QUANTITY_PATTERN, "a Kubernetes quantity (e.g. 512Mi, 2Gi, 500m)")
CountOrPercent = _int_or_string(PERCENT_PATTERN, "a count or a percentage (e.g. 1, 25%)")
NonEmpty = Annotated[str, Field(min_length=1, max_length=253)]


def _object_items(required: list[str], **properties: Any) -> dict[str, Any]:
    """CRD item schema of a Kubernetes type passed through as is: the keys we know are typed,
    the rest is kept."""
    return {
        "items": {
            "type": "object",
            "required": required,
            "properties": properties,
            "x-kubernetes-preserve-unknown-fields": True,
        }
    }


_STRING = {"type": "string"}
_TOLERATION_ITEMS = {
    "items": {
        "type": "object",
        "properties": {
            "key": _STRING,
            "operator": {"type": "string", "enum": ["Exists", "Equal"]},
            "value": _STRING,
            "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
            "tolerationSeconds": {"type": "integer", "format": "int64"},
        },
    }
}
_ENV_ITEMS = {
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "value": _STRING,
            "valueFrom": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
}
_NAME_REF_ITEMS = {
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 253}},
    }
}
_VOLUME_MOUNT_ITEMS = {
    "items": {
        "type": "object",
        "required": ["name", "mountPath"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "mountPath": {"type": "string", "pattern": r"^/"},
            "readOnly": {"type": "boolean"},
            "subPath": _STRING,
            "subPathExpr": _STRING,
            "mountPropagation": {"type": "string", "enum": ["None", "HostToContainer", "Bidirectional"]},
            "recursiveReadOnly": {"type": "string", "enum": ["Disabled", "IfPossible", "Enabled"]},
        },
    }
}


def at_most(limit: int, reason: str) -> dict[str, Any]:
    """Field keywords for a bound that needs its reason in the error: ``le`` for pydantic and the
    CRD's ``maximum``, plus the reason, which the CRD turns into a CEL rule message and
    ``parse_spec`` into its error."""
    return {"le": limit, "json_schema_extra": {"maximumReason": reason}}


def cel_rules(*rules: dict[str, str]) -> ConfigDict:
    """Model config carrying a class's CEL rules into the CRD (see tusk.operator.schema)."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class SecretRef(_Spec):
    """A key in a Secret of the ModelDeployment's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN, description="Secret name.")
    key: str = Field("token", min_length=1, description="Key inside the Secret.")


class CacheSpec(_Spec):
    """Where hf:// downloads go: a size-limited emptyDir, or a shared PVC when one is named."""

    size_limit: Quantity = Field(
        "20Gi",
        alias="sizeLimit",
        description="Size limit (and ephemeral-storage request) of the per-pod download cache.",
    )
    persistent_volume_claim: str | None = object_name_field(
        "persistentVolumeClaim", "A shared model-cache PVC (ReadWriteMany) used instead of the per-pod cache."
    )


class ModelSource(_Spec):
    """The model to serve and how its files reach the workers."""

    model_config = cel_rules(
        {
            "rule": "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
            "message": "model.tokenSecretRef is only used with hf:// sources",
            "fieldPath": ".tokenSecretRef",
            "reason": CEL_FORBIDDEN,
        }
    )

    source: str = Field(
        max_length=1024,
        pattern=MODEL_SOURCE_PATTERN,
        description=(
            "tiny | hf://ORG/NAME[@REVISION] | hf://ORG/NAME/FILE.gguf | pvc://CLAIM[/SUBPATH] | "
            "image://IMAGE | /absolute/path (a folder, or a .gguf file). pvc:// claims are mounted "
            "read-only: ReadOnlyMany or ReadWriteMany for more than one worker node."
        ),
    )
    token_secret_ref: SecretRef | None = Field(
        None, alias="tokenSecretRef", description="Hugging Face token for hf:// sources."
    )
    image_path: str = Field(
        "/model",
        alias="imagePath",
        pattern=r"^/",
        description="Folder holding the model inside an image:// source.",
    )
    cache: CacheSpec = Field(CacheSpec(), description="Download cache of hf:// sources.")

    @property
    def kind(self) -> Literal["tiny", "hf", "pvc", "image", "path"]:
        for prefix, kind in (("hf://", "hf"), ("pvc://", "pvc"), ("image://", "image")):
            if self.source.startswith(prefix):
                return kind  # type: ignore[return-value]
        return "tiny" if self.source == "tiny" else "path"

    @property
    def is_gguf(self) -> bool:
        """The source names one GGUF file rather than a model folder."""
        return self.source.endswith(".gguf")

    @model_validator(mode="after")
    def _token_only_for_hf(self) -> ModelSource:
        if self.token_secret_ref is not None and self.kind != "hf":
            raise ValueError("model.tokenSecretRef is only used with hf:// sources")
        return self


class Resources(_Spec):
    """Container resources, as in a Pod. The accelerator resource is added to limits."""

    limits: dict[str, Quantity] = {}
    requests: dict[str, Quantity] = {}


class RolloutSpec(_Spec):
    """Deployment rolling-update bounds; maxSurge 0 by default so a rollout needs no spare GPU."""

    model_config = cel_rules(
        {
            "rule": (
                "!has(self.maxSurge) || !has(self.maxUnavailable) || "
                "!(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])"
            ),
            "message": "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
            "fieldPath": ".maxUnavailable",
            "reason": CEL_INVALID,
        }
    )

    max_surge: CountOrPercent = Field(
        0, alias="maxSurge", description="Extra pods during a rollout (a count or a percentage)."
    )
    max_unavailable: CountOrPercent = Field(
        1, alias="maxUnavailable", description="Pods that may be down during a rollout."
    )

    @model_validator(mode="after")
    def _can_progress(self) -> RolloutSpec:
        if str(self.max_surge) in ("0", "0%") and str(self.max_unavailable) in ("0", "0%"):
            raise ValueError("rollout.maxSurge and rollout.maxUnavailable cannot both be 0")
        return self


class RoleSpec(_Spec):
    """One role's workers: how many, on which accelerator, and how their pods look."""

    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Number of worker pods.")
    accelerator: Accelerator = Field(
        "cpu", description="Accelerator vendor; sets the device resource and the worker image."
    )
    accelerators_per_replica: int = Field(
        1,
        ge=1,
        alias="acceleratorsPerReplica",
        description="Devices per worker pod (ignored for cpu).",
        **at_most(1, "tensor parallelism is not supported yet; use one device per worker"),
    )
    resources: Resources = Field(
        Resources(),
        description="Container resources, as in a Pod. The accelerator resource is added to limits.",
    )
    node_selector: dict[str, str] = Field({}, alias="nodeSelector", description="As in a Pod spec.")
    tolerations: list[dict[str, Any]] = Field(
        [], description="As in a Pod spec.", json_schema_extra=_TOLERATION_ITEMS
    )
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity rules, as in a Pod spec.")
    env: list[dict[str, Any]] = Field(
        [], description="Extra environment of the worker container.", json_schema_extra=_ENV_ITEMS
    )
    image: str | None = Field(
        None, description="Worker image for this role; defaults to spec.image, then the operator's default."
    )
    image_pull_secrets: list[dict[str, Any]] = Field(
        [],
        alias="imagePullSecrets",
        description="Secrets for pulling the worker image, as in a Pod spec.",
        json_schema_extra=_NAME_REF_ITEMS,
    )
    service_account_name: str | None = object_name_field(
        "serviceAccountName", "ServiceAccount the worker pods run as."
    )
    priority_class_name: str | None = object_name_field(
        "priorityClassName", "PriorityClass of the worker pods."
    )
    runtime_class_name: str | None = object_name_field(
        "runtimeClassName", "RuntimeClass of the worker pods (e.g. nvidia)."
    )
    topology_spread_constraints: list[dict[str, Any]] = Field(
        [],
        alias="topologySpreadConstraints",
        description="Topology spread constraints, as in a Pod spec.",
        json_schema_extra=_object_items(
            ["maxSkew", "topologyKey", "whenUnsatisfiable"],
            maxSkew={"type": "integer", "format": "int32", "minimum": 1, "maximum": MAX_REPLICAS},
            topologyKey={"type": "string", "minLength": 1},
            whenUnsatisfiable={"type": "string", "enum": ["DoNotSchedule", "ScheduleAnyway"]},
        ),
    )
    volumes: list[dict[str, Any]] = Field(
        [],
        description="Extra pod volumes, as in a Pod spec.",
        json_schema_extra=_object_items(
            ["name"], name={"type": "string", "maxLength": 63, "pattern": DNS_LABEL_PATTERN}
        ),
    )
    volume_mounts: list[dict[str, Any]] = Field(
        [],
        alias="volumeMounts",
        description="Extra volume mounts of the worker container.",
        json_schema_extra=_VOLUME_MOUNT_ITEMS,
    )
    pod_template: dict[str, Any] = Field(
        {},
        alias="podTemplate",
        description=(
            "A strategic-merge patch applied last onto the generated pod template "
            "(containers merge by name), for anything the fields above do not cover."
        ),
    )
    rollout: RolloutSpec = Field(RolloutSpec(), description="Rolling-update bounds of the role's Deployment.")


class PrefillSpec(RoleSpec):
    """The prefill workers; none by default (decode workers then prefill for themselves)."""

    replicas: int = Field(0, ge=0, le=MAX_REPLICAS, description="Number of prefill worker pods.")


class DecodeSpec(RoleSpec):
    """The decode workers; the scale subresource (kubectl scale, an HPA) sets their count."""

    replicas: int = Field(
        1, ge=0, le=MAX_REPLICAS, description="Number of decode worker pods; 0 scales the model to zero."
    )


_ENGINE_DEFAULTS = EngineConfig.model_fields


class EngineSpec(_Spec):
    """Engine knobs passed to every worker; unset ones take the engine's defaults."""

    model_config = cel_rules(
        {
            # The engine's own check (tusk.config.EngineConfig), with its defaults for unset fields.
            "rule": (
                f"(has(self.maxNumBatchedTokens) ? self.maxNumBatchedTokens : "
                f"{_ENGINE_DEFAULTS['max_num_batched_tokens'].default}) >= "
                f"(has(self.maxNumSeqs) ? self.maxNumSeqs : {_ENGINE_DEFAULTS['max_num_seqs'].default})"
            ),
            "message": (
                "engine.maxNumBatchedTokens must be at least engine.maxNumSeqs: every running sequence "
                "needs one token of the step budget"
            ),
            "fieldPath": ".maxNumBatchedTokens",
            "reason": CEL_INVALID,
        }
    )

    name: Literal["tusk", "vllm"] = Field(
        "tusk",
        description=(
            "The workers' engine: tusk, or vllm (vLLM's OpenAI server, `vllm serve`, with KV events "
            "on; decode workers only, served through a Gateway's InferencePool)."
        ),
    )
    max_num_seqs: int | None = Field(
        None, ge=1, le=MAX_SEQS, alias="maxNumSeqs", description="Concurrent sequences per worker."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, alias="maxNumBatchedTokens", description="Tokens per engine step."
    )
    kv_cache_memory_fraction: float | None = Field(
        None,
        ge=0.05,
        le=1,
        alias="kvCacheMemoryFraction",
        description="Share of the device memory given to the KV cache.",
    )
    kernel_backend: KernelBackend | None = Field(
        None, alias="kernelBackend", description="Force a tusk.kernels backend; unset picks per device."
    )

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> EngineSpec:
        seqs = self.max_num_seqs or _ENGINE_DEFAULTS["max_num_seqs"].default
        tokens = self.max_num_batched_tokens or _ENGINE_DEFAULTS["max_num_batched_tokens"].default
        if tokens < seqs:
            raise ValueError(
                "engine.maxNumBatchedTokens must be at least engine.maxNumSeqs: every running sequence "
                "needs one token of the step budget"
            )
        return self


class ManagedTier(_Spec):
    """A Valkey server the operator runs for this deployment."""

    replicas: int = Field(
        1,
        ge=0,
        description="0 stops the tier.",
        **at_most(1, "kvTier.managed runs at most one server; use kvTier.external for a cluster"),
    )
    memory: Quantity = Field("1Gi", description="Memory limit of the server; maxmemory is set to 80% of it.")
    maxmemory_policy: Literal[MAXMEMORY_POLICIES] = Field(  # type: ignore[valid-type]
        "allkeys-lru", alias="maxmemoryPolicy", description="Eviction policy."
    )
    image: str = Field("valkey/valkey:8.1.4", min_length=1, description="Server image.")


class PasswordRef(SecretRef):
    """The Secret key holding the tier password."""

    key: str = Field("password", min_length=1, description="Key inside the Secret.")


class ExternalTier(_Spec):
    """A Redis-compatible server run elsewhere."""

    url: str = Field(
        max_length=2048,
        pattern=REDIS_URL_PATTERN,
        description="redis://, rediss://, valkey://, valkeys:// or unix:// URL without the password.",
    )
    secret_ref: PasswordRef | None = Field(
        None, alias="secretRef", description="Secret holding the tier password."
    )


class KVTierSpec(_Spec):
    """Shared KV block tier: a managed Valkey, an external Redis-compatible URL, or none ({})."""

    model_config = cel_rules(
        {
            "rule": "!(has(self.managed) && has(self.external))",
            "message": "kvTier: set either external (url) or managed, not both",
            "fieldPath": ".external",
            "reason": CEL_FORBIDDEN,
        }
    )

    managed: ManagedTier | None = None
    external: ExternalTier | None = None

    @model_validator(mode="after")
    def _one_of(self) -> KVTierSpec:
        if self.managed is not None and self.external is not None:
            raise ValueError("kvTier: set either external (url) or managed, not both")
        return self


def _routing_settings_model() -> type[BaseModel]:
    """The policy knobs as a model generated from the policies' own signatures, so the CRD lists
    every setting by name and type; a name no policy takes, or a value of another type, is an
    error (``extra="forbid"``, ``strict``: "1" is not a number, 1 is not a boolean).
    ``disaggregation_threshold_tokens`` is left out: it is ``disaggregationThreshold``."""
    fields: dict[str, Any] = {}
    for name, kind in setting_types().items():
        if name == "disaggregation_threshold_tokens":
            continue
        if kind is int:  # counts and token numbers: never negative, and an int32 as the CRD says
            kind = Annotated[int, Field(ge=0, le=2**31 - 1)]
        description = f"The {name} policy setting; unset = the policy's default."
        fields[name] = (kind | None, Field(None, description=description))
    return create_model(
        "RoutingSettings",
        __config__=ConfigDict(extra="forbid", frozen=True, strict=True),
        __doc__="Policy settings by name (tusk.router.policies); a policy ignores the ones it does not take.",
        **fields,
    )


RoutingSettings = _routing_settings_model()


def _admission_default(name: str) -> Any:
    return AdmissionConfig.model_fields[name].default


class AdmissionSpec(_Spec):
    """The router's admission queue for this model (tusk.router.admission): requests wait at the
    router while every worker has a prefill backlog, and the least work goes first."""

    backlog_seconds: float = Field(
        _admission_default("backlog_s"),
        ge=0,
        le=3600,
        alias="backlogSeconds",
        description="Hold requests while every worker has this many seconds of prefill queued; 0 turns the queue off.",
    )
    aging: float = Field(
        _admission_default("aging"),
        gt=0,
        le=1000,
        description="Seconds of work a waiting request's rank gains per second it waits (bounds how long a long prompt is overtaken).",
    )
    max_waiting: int = Field(
        _admission_default("max_waiting"),
        ge=1,
        le=1_000_000,
        alias="maxWaiting",
        description="Requests waiting beyond this many are refused with HTTP 429.",
    )

    def to_config(self) -> AdmissionConfig:
        return AdmissionConfig(backlog_s=self.backlog_seconds, aging=self.aging, max_waiting=self.max_waiting)


class RoutingSpec(_Spec):
    """How the router picks workers for this model. A router-only setting: changing it restarts
    no worker."""

    policy: PolicyName = Field("cost", description="Router policy for this model.")
    disaggregation_threshold: int | None = Field(
        None,
        ge=0,
        le=MAX_TOKENS,
        alias="disaggregationThreshold",
        description="Uncached prompt tokens above which prefill runs on a prefill worker; unset = tuned online.",
    )
    settings: RoutingSettings = Field(  # type: ignore[valid-type]
        RoutingSettings(),
        description="Policy settings (the router's routing.settings); unset ones keep the policy's default.",
    )
    admission: AdmissionSpec = Field(
        AdmissionSpec(), description="The router's admission queue for this model."
    )

    def to_config(self) -> RoutingConfig:
        """The router's RoutingConfig; raises ValueError for a value the policy refuses."""
        return RoutingConfig(
            policy=self.policy,
            disaggregation_threshold_tokens=self.disaggregation_threshold,
            settings=self.settings.model_dump(exclude_none=True),  # type: ignore[attr-defined]
            admission=self.admission.to_config(),
        )

    @field_validator("settings")
    @classmethod
    def _policy_takes_settings(cls, settings: BaseModel, info: ValidationInfo) -> BaseModel:
        """A value the policy refuses (a weight for an unknown scorer...) fails here, naming
        spec.routing.settings, as it would fail in the router."""
        if "policy" in info.data:  # else the policy itself is the error
            RoutingConfig(policy=info.data["policy"], settings=settings.model_dump(exclude_none=True))
        return settings


class ModelDeploymentSpec(_Spec):
    """A model served by prefill and decode workers behind the tusk router, with a shared KV tier."""

    model: ModelSource
    served_model_names: list[NonEmpty] = Field(
        [],
        alias="servedModelNames",
        max_length=32,
        description="Names clients use in the OpenAI API; defaults to the ModelDeployment name.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder or hf:// id, when it differs from the model."
    )
    dtype: Literal[DTYPES] = Field("auto", description="Weights and activations dtype.")  # type: ignore[valid-type]
    max_model_len: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS,
        alias="maxModelLen",
        description="Longest sequence (prompt + output) in tokens.",
    )
    block_size: int = Field(
        16, ge=1, le=1024, alias="blockSize", description="KV block size in tokens; must match across roles."
    )
    image: str | None = Field(
        None, description="Worker image; defaults to the operator's image for the accelerator."
    )
    engine: EngineSpec = Field(EngineSpec(), description="Engine knobs passed to every worker.")
    prefill: PrefillSpec = Field(
        PrefillSpec(),
        description=(
            "The prefill workers, which compute prompts' KV blocks; none by default "
            "(decode workers then prefill for themselves)."
        ),
    )
    decode: DecodeSpec = Field(
        DecodeSpec(),
        description=(
            "The decode workers, which generate tokens; kubectl scale and an HPA set their count "
            "(0 scales the model to zero)."
        ),
    )
    kv_tier: KVTierSpec = Field(
        KVTierSpec(managed=ManagedTier()),
        alias="kvTier",
        description="Shared KV block tier: a managed Valkey, an external Redis-compatible URL, or none ({}).",
    )
    routing: RoutingSpec = Field(RoutingSpec(), description="How the router picks workers for this model.")
    paused: bool = Field(
        False, description="Stop changing children (no rollouts, no drift repair); status is still reported."
    )


class InvalidSpec(ValueError):
    """A spec the operator cannot act on; the message is shown in the Degraded condition as is."""


def _field(loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo at an error location (aliases or names), or None."""
    models: list[Any] = [ModelDeploymentSpec]
    info = None
    for part in loc:
        model = next((m for m in models if isinstance(m, type) and issubclass(m, BaseModel)), None)
        if model is None:
            return None
        info = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if info is None:
            return None
        models = [info.annotation, *get_args(info.annotation)]
    return info


def _problem(error: Any) -> str:
    """One readable line per pydantic error, naming the field as the CRD does."""
    where = ".".join(str(part) for part in error["loc"])
    field = f"spec.{where}" if where else "spec"
    info = _field(error["loc"])
    context = error.get("ctx") or {}
    extra = (info.json_schema_extra if info is not None else None) or {}
    if error["type"] == "less_than_equal":
        reason = f": {extra['maximumReason']}" if "maximumReason" in extra else ""
        return f"{field} must be at most {context.get('le')}{reason}"
    if error["type"] == "greater_than_equal":
        return f"{field} must be at least {context.get('ge')}"
    if error["type"] == "string_pattern_mismatch":
        expected = f": {info.description.split('. ')[0]}" if info is not None and info.description else ""
        return f"{field}: {error['input']!r} is not valid{expected}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}" if where else message


def parse_spec(raw: dict[str, Any] | None) -> ModelDeploymentSpec:
    """Parse a spec (as stored in the API server) or raise InvalidSpec with a one-line reason."""
    try:
        return ModelDeploymentSpec.model_validate(dict(raw or {}))
    except ValidationError as exc:
        raise InvalidSpec("; ".join(_problem(error) for error in exc.errors())) from None

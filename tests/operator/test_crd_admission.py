"""The ModelDeployment CRD as a real API server treats it (modelled in crd_server_model).

The CRD must be accepted (every CEL rule holds on every default as written), a minimal spec must
be admitted and stored with the same defaults the operator assumes, and bad specs must be refused
up front with a message that names the field, never become a crash-looping pod or a 404.
"""

from __future__ import annotations

import copy
import re

import pytest
from crd_server_model import Refused, admit, crd_errors, default_errors, nodes, rule_errors, storage_schema
from kubernetes.utils import parse_quantity
from tusk.operator import manifests, schema, spec
from tusk.operator.spec import InvalidSpec, parse_spec
from tusk.router.policies import POLICY_NAMES, SETTING_NAMES

from tusk.kernel_backends import KERNEL_BACKENDS

CRD = manifests.crd()
SCHEMA = storage_schema(CRD)
MINIMAL = {"model": {"source": "tiny"}}


def _md(spec_: dict, name: str = "m1") -> dict:
    return {
        "apiVersion": f"{schema.GROUP}/{schema.VERSION}",
        "kind": schema.KIND,
        "metadata": {"name": name, "namespace": "default"},
        "spec": copy.deepcopy(spec_),
    }


def _node(path: str) -> dict:
    return dict(nodes(SCHEMA))[path]


# --- the CRD itself --------------------------------------------------------------------------------


def test_the_crds_are_accepted_by_the_server() -> None:
    assert crd_errors(CRD) == []
    for peering in manifests.peering_crds():
        assert crd_errors(peering) == []


def test_the_model_sees_the_rule_that_broke_on_a_real_server() -> None:
    """The shape the real API server refused: a rule reading a field that the default ({})
    only gets from a nested default. Guarded with has() it is accepted."""
    role = {
        "type": "object",
        "default": {},
        "properties": {"replicas": {"type": "integer", "default": 1}},
        "x-kubernetes-validations": [
            {"rule": "self.replicas >= 1", "message": "decode.replicas must be at least 1"}
        ],
    }
    broken = {"type": "object", "properties": {"decode": role}}
    (error,) = default_errors(broken)
    assert error.startswith(".decode.default") and "no such key: replicas" in error
    role["x-kubernetes-validations"][0]["rule"] = "!has(self.replicas) || self.replicas >= 1"
    assert default_errors(broken) == []


def test_the_model_sees_unbounded_rule_costs_and_bad_field_paths() -> None:
    node = {
        "type": "object",
        "properties": {"source": {"type": "string"}},
        "x-kubernetes-validations": [
            {"rule": "self.source.startsWith('a')", "message": "m", "fieldPath": ".src", "reason": "Bad"}
        ],
    }
    errors = rule_errors(node)
    assert any("source needs maxLength" in e for e in errors)
    assert any("fieldPath .src is not a field" in e for e in errors)
    assert any("reason must be one of" in e for e in errors)


def test_every_default_is_listed_and_holds_as_written() -> None:
    defaulted = [path for path, node in nodes(SCHEMA) if "default" in node]
    # The object defaults the server checks with CEL on their own, before any nested default.
    assert {".spec.decode", ".spec.prefill", ".spec.kvTier", ".spec.routing", ".spec.model.cache"} <= set(
        defaulted
    )
    assert default_errors(SCHEMA) == []


def test_every_rule_has_a_reason_and_rules_on_one_field_point_at_it() -> None:
    rules = [
        (path, rule) for path, node in nodes(SCHEMA) for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 6
    for path, rule in rules:
        assert rule.get("reason"), (path, rule["rule"])
        fields = set(re.findall(r"self\.(\w+)", rule["rule"])) - {"metadata"}
        if len(fields) == 1:
            assert rule.get("fieldPath") == f".{fields.pop()}", (path, rule["rule"])


def test_enums_are_the_codes_own_lists() -> None:
    assert _node(".spec.routing.policy")["enum"] == list(POLICY_NAMES)
    assert _node(".spec.engine.kernelBackend")["enum"] == list(KERNEL_BACKENDS)
    assert _node(".spec.decode.accelerator")["enum"] == list(spec.ACCELERATORS)


def test_kubectl_explain_has_descriptions_and_the_crd_is_not_in_all() -> None:
    for path in ("", ".spec", ".spec.model", ".spec.routing", ".spec.decode", ".spec.kvTier"):
        assert len(_node(path).get("description", "")) > 20, path
    assert "all" not in CRD["spec"]["names"]["categories"]


def test_integers_have_maxima() -> None:
    unbounded = [
        path
        for path, node in nodes(_node(".spec"), ".spec")
        if node.get("type") == "integer" and "maximum" not in node and not path.endswith("tolerationSeconds")
    ]
    assert unbounded == []


# --- objects ---------------------------------------------------------------------------------------


def test_a_minimal_spec_is_admitted_with_the_operators_defaults() -> None:
    stored = admit(CRD, _md(MINIMAL))
    # Defaults defined once: what the server stores parses to exactly what the operator assumes
    # for the bare spec, field by field.
    assert parse_spec(stored["spec"]) == parse_spec(MINIMAL)
    assert stored["spec"]["decode"]["replicas"] == 1 and stored["spec"]["prefill"]["replicas"] == 0
    assert stored["spec"]["kvTier"] == {
        "managed": {
            "replicas": 1,
            "memory": "1Gi",
            "maxmemoryPolicy": "allkeys-lru",
            "image": "valkey/valkey:8.1.4",
        }
    }
    assert stored["spec"]["routing"]["policy"] == "cost"
    assert stored["spec"]["model"]["cache"] == {"sizeLimit": "20Gi"}
    assert stored["spec"]["decode"]["rollout"] == {"maxSurge": 0, "maxUnavailable": 1}


def _everything() -> dict:
    return {
        "model": {
            "source": "hf://org/model@main",
            "tokenSecretRef": {"name": "hf-token"},
            "cache": {"sizeLimit": "50Gi", "persistentVolumeClaim": "model-cache"},
        },
        "servedModelNames": ["a", "b"],
        "maxModelLen": 8192,
        "engine": {"maxNumSeqs": 64, "kvCacheMemoryFraction": 0.9, "kernelBackend": "torch"},
        "prefill": {"replicas": 1},
        "decode": {
            "replicas": 0,
            "accelerator": "nvidia",
            "resources": {"requests": {"cpu": "500m", "memory": 2048}, "limits": {"memory": "4Gi"}},
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccountName": "workers",
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "podTemplate": {"metadata": {"labels": {"team": "a"}}},
            "rollout": {"maxSurge": "25%", "maxUnavailable": 0},
        },
        "kvTier": {"external": {"url": "redis://cache:6379", "secretRef": {"name": "tier"}}},
        "routing": {"policy": "cache_aware", "disaggregationThreshold": 512},
    }


def test_every_field_is_admitted_and_parsed_alike() -> None:
    raw = _everything()
    stored = admit(CRD, _md(raw))
    assert parse_spec(stored["spec"]) == parse_spec(raw)
    parsed = parse_spec(stored["spec"])
    assert parsed.decode.replicas == 0  # scale to zero
    assert parsed.decode.rollout.max_surge == "25%" and parsed.decode.rollout.max_unavailable == 0
    assert parsed.decode.image_pull_secrets == [{"name": "regcred"}]
    assert parsed.model.cache.persistent_volume_claim == "model-cache"


@pytest.mark.parametrize(
    "source",
    [
        "tiny",
        "hf://org/name",
        "hf://org/name@v1.0",
        "hf://bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf",
        "pvc://weights/llama/8b",
        "pvc://weights/smol/model.Q4_1.gguf",
        "/models/smol.gguf",
        "image://registry.example/models/llama:1",
    ],
)
def test_model_sources_including_gguf_files(source) -> None:
    stored = admit(CRD, _md({"model": {"source": source}}))
    assert parse_spec(stored["spec"]).model.source == source


def _with(path: str, value) -> dict:
    raw = copy.deepcopy(MINIMAL)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


HUGE = 2**40
BAD_SPECS = [
    # (what, spec, the field the server names, words in the server message)
    ("policy", _with("routing.policy", "nonexistent"), ".spec.routing.policy", "is not one of"),
    ("kernel backend", _with("engine.kernelBackend", "cuda-magic"), ".spec.engine.kernelBackend", "is not one of"),
    ("memory", _with("decode.resources.limits.memory", "lots"), ".spec.decode.resources.limits.memory", "does not match"),
    ("tier memory", _with("kvTier.managed.memory", "1 GB"), ".spec.kvTier.managed.memory", "does not match"),
    ("cache size", _with("model.cache.sizeLimit", "big"), ".spec.model.cache.sizeLimit", "does not match"),
    ("replicas", _with("decode.replicas", HUGE), ".spec.decode.replicas", "is greater than the maximum"),
    ("negative replicas", _with("prefill.replicas", -1), ".spec.prefill.replicas", "less than the minimum"),
    ("block size", _with("blockSize", 4096), ".spec.blockSize", "is greater than the maximum"),
    ("max model len", _with("maxModelLen", HUGE), ".spec.maxModelLen", "is greater than the maximum"),
    ("max num seqs", _with("engine.maxNumSeqs", 10**6), ".spec.engine.maxNumSeqs", "is greater than the maximum"),
    ("step budget", _with("engine", {"maxNumSeqs": 256, "maxNumBatchedTokens": 128}), ".spec.engine.maxNumBatchedTokens", "at least engine.maxNumSeqs"),
    ("step budget default", _with("engine.maxNumSeqs", 4096), ".spec.engine.maxNumBatchedTokens", "at least engine.maxNumSeqs"),
    ("kv fraction", _with("engine.kvCacheMemoryFraction", 0.01), ".spec.engine.kvCacheMemoryFraction", "minimum"),
    ("tp", _with("decode.acceleratorsPerReplica", 2), ".spec.decode.acceleratorsPerReplica", "tensor parallelism"),
    ("tier servers", _with("kvTier.managed.replicas", 2), ".spec.kvTier.managed.replicas", "at most one server"),
    (
        "both tiers",
        _with("kvTier", {"managed": {}, "external": {"url": "redis://cache:6379"}}),
        ".spec.kvTier.external",
        "either external (url) or managed",
    ),
    ("tier url", _with("kvTier", {"external": {"url": "http://cache"}}), ".spec.kvTier.external.url", "does not match"),
    ("token for tiny", _with("model.tokenSecretRef", {"name": "t"}), ".spec.model.tokenSecretRef", "only used with hf://"),
    ("source", _with("model.source", "s3://bucket/model"), ".spec.model.source", "does not match"),
    ("gguf without repo", _with("model.source", "hf://model.gguf"), ".spec.model.source", "does not match"),
    ("accelerator", _with("decode.accelerator", "tpu"), ".spec.decode.accelerator", "is not one of"),
    ("dtype", _with("dtype", "int4"), ".spec.dtype", "is not one of"),
    (
        "rollout",
        _with("decode.rollout", {"maxSurge": 0, "maxUnavailable": "0%"}),
        ".spec.decode.rollout.maxUnavailable",
        "cannot both be 0",
    ),
    ("negative memory", _with("decode.resources.requests.memory", -1), ".spec.decode.resources.requests.memory", "minimum"),
    ("surge", _with("decode.rollout", {"maxSurge": "lots"}), ".spec.decode.rollout.maxSurge", "does not match"),
    ("service account", _with("decode.serviceAccountName", "Not_A_Name"), ".spec.decode.serviceAccountName", "match"),
    ("pull secret", _with("prefill.imagePullSecrets", [{}]), ".spec.prefill.imagePullSecrets[0]", "'name' is a required"),
    ("mount", _with("decode.volumeMounts", [{"name": "x", "mountPath": "rel"}]), ".spec.decode.volumeMounts[0].mountPath", "match"),
    ("typo", _with("decode.replica", 2), ".spec.decode.replica", "unknown field"),
    ("setting typo", _with("routing.settings", {"cache_treshold": 0.5}), ".spec.routing.settings.cache_treshold", "unknown field"),
    ("setting value", _with("routing.settings", {"cache_threshold": "high"}), ".spec.routing.settings.cache_threshold", "is not of type"),
    ("setting type", _with("routing.settings", {"claim_routes": 1}), ".spec.routing.settings.claim_routes", "is not of type"),
    ("scorer weight", _with("routing.settings", {"weights": {"prefix": "x"}}), ".spec.routing.settings.weights.prefix", "is not of type"),
    ("two names", _with("routing.settings", {"disaggregation_threshold_tokens": 5}), ".spec.routing.settings.disaggregation_threshold_tokens", "unknown field"),
    ("admission aging", _with("routing.admission", {"aging": 0}), ".spec.routing.admission.aging", "less than or equal to the minimum"),
    ("admission queue", _with("routing.admission", {"maxWaiting": 0}), ".spec.routing.admission.maxWaiting", "less than the minimum"),
    ("served name", _with("servedModelNames", [""]), ".spec.servedModelNames[0]", "non-empty"),
    ("no source", {"model": {}}, ".spec.model", "'source' is a required"),
]  # fmt: skip


# Kubernetes objects the operator passes through as is, and typos: the server prunes unknown fields
# before the operator sees an object, so only the server can refuse these.
SERVER_ONLY = {"pull secret", "mount", "typo"}


@pytest.mark.parametrize(("what", "raw", "field", "words"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_refused_naming_the_field(what, raw, field, words) -> None:
    with pytest.raises(Refused) as refused:
        admit(CRD, _md(raw))
    assert any(e.startswith(f"{field}:") and words in e for e in refused.value.errors), refused.value.errors
    if what in SERVER_ONLY:
        return
    # The operator refuses the same spec too (old objects, a CRD not yet upgraded), naming the field.
    with pytest.raises(InvalidSpec) as invalid:
        parse_spec(raw)
    top = field.removeprefix(".spec.").split(".")[0].split("[")[0]
    assert f"spec.{top}" in str(invalid.value), str(invalid.value)


def test_bad_metadata_names_are_refused() -> None:
    with pytest.raises(Refused, match="at most 48 characters"):
        admit(CRD, _md(MINIMAL, name="x" * 60))
    with pytest.raises(Refused, match="DNS label starting with a letter"):
        admit(CRD, _md(MINIMAL, name="1model"))


def test_operator_reasons_name_the_field_and_say_why() -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(_with("decode.acceleratorsPerReplica", 2))
    assert str(info.value) == (
        "spec.decode.acceleratorsPerReplica must be at most 1: "
        "tensor parallelism is not supported yet; use one device per worker"
    )
    with pytest.raises(InvalidSpec, match=r"spec\.model\.source: 's3://x' is not valid: tiny \| hf://"):
        parse_spec(_with("model.source", "s3://x"))


QUANTITIES = ["1", "0", "500m", "0.5", ".5", "1.5Gi", "2048Mi", "1e3", "1E3", "+1", "10k", "1n", "3u", "7Ei"]
NOT_QUANTITIES = ["lots", "1 GB", "1GB", "12Mi ", "1ki", "Gi", "1.2.3", ""]


@pytest.mark.parametrize("text", QUANTITIES + NOT_QUANTITIES)
def test_the_quantity_pattern_accepts_what_kubernetes_parses(text) -> None:
    def parses(value: str) -> bool:
        try:
            parse_quantity(value)
        except ValueError:
            return False
        return True

    assert bool(re.match(spec.QUANTITY_PATTERN, text)) == parses(text) == (text in QUANTITIES)


def test_cel_runs_after_a_bound_error_but_not_after_an_enum_error() -> None:
    """As the server: a value over its maximum still gets the CEL rule's explanation; a value
    outside its enum stops CEL (the object no longer has the shape the rules expect)."""
    with pytest.raises(Refused) as refused:
        admit(CRD, _md(_with("decode.acceleratorsPerReplica", 2)))
    assert len(refused.value.errors) == 2 and "tensor parallelism" in refused.value.errors[1]
    raw = _with("decode.acceleratorsPerReplica", 2)
    raw["routing"] = {"policy": "nonexistent"}
    with pytest.raises(Refused) as refused:
        admit(CRD, _md(raw))
    assert not any("tensor parallelism" in e for e in refused.value.errors)
    assert "some validation rules were not checked" in refused.value.errors[-1]


def test_routing_settings_list_every_policy_setting_and_reach_the_router() -> None:
    """Every knob a policy takes is a typed CRD field (one name each: the threshold is
    disaggregationThreshold), and what is admitted is what the router's RoutingConfig gets."""
    listed = set(_node(".spec.routing.settings")["properties"])
    assert listed == set(SETTING_NAMES) - {"disaggregation_threshold_tokens"}
    routing = {
        "policy": "llmd_sticky",
        "disaggregationThreshold": 512,
        "settings": {
            "queue_depth_threshold": 3,
            "kv_util_threshold": 0.5,
            "weights": {"prefix": 2, "queue": 1},
        },
    }
    stored = admit(CRD, _md({**MINIMAL, "routing": routing}))
    config = parse_spec(stored["spec"]).routing.to_config()
    assert config.policy == "llmd_sticky" and config.disaggregation_threshold_tokens == 512
    assert config.settings == {
        "queue_depth_threshold": 3,
        "kv_util_threshold": 0.5,
        "weights": {"prefix": 2.0, "queue": 1.0},
    }
    assert parse_spec(admit(CRD, _md(MINIMAL))["spec"]).routing.to_config().settings == {}


def test_the_admission_queue_is_set_per_model_and_defaults_to_the_routers() -> None:
    from tusk.config import AdmissionConfig

    stored = admit(CRD, _md(MINIMAL))
    assert parse_spec(stored["spec"]).routing.to_config().admission == AdmissionConfig()
    raw = {"backlogSeconds": 0, "aging": 0.5, "maxWaiting": 10}
    stored = admit(CRD, _md({**MINIMAL, "routing": {"admission": raw}}))
    assert stored["spec"]["routing"]["admission"] == raw
    config = parse_spec(stored["spec"]).routing.to_config().admission
    assert config == AdmissionConfig(backlog_s=0, aging=0.5, max_waiting=10)


def test_a_setting_the_policy_refuses_is_named_by_the_operator() -> None:
    """Beyond types the policy checks its own values (here a weight for an unknown scorer)."""
    with pytest.raises(InvalidSpec, match=r"spec\.routing\.settings: unknown scorer\(s\) nope"):
        parse_spec(_with("routing", {"policy": "weighted", "settings": {"weights": {"nope": 1}}}))

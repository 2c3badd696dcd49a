"""Every pod the operator creates passes ``restricted`` admission; model sources and per-role pod
fields land in the pod template as users expect."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pod_security import restricted_violations
from tusk.operator.desired import Defaults, Owner, desired_children, strategic_merge
from tusk.operator.preflight import spec_problems
from tusk.operator.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
OWNER = Owner("llama", "models", "uid-1")
SOURCES = ["tiny", "hf://org/m", "pvc://weights/m", "image://registry.example/m:1", "/opt/m"]


def _templates(spec: dict) -> dict[str, dict]:
    children = desired_children(OWNER, parse_spec(spec), Defaults())
    return {c["metadata"]["name"]: c["spec"]["template"] for c in children if c["kind"] == "Deployment"}


def _worker(spec: dict, role: str = "decode") -> dict:
    return _templates(spec)[f"llama-{role}"]


def test_checker_catches_each_restricted_rule() -> None:
    """The checker is not a tautology: each rule flags a pod that breaks it."""
    good = _worker({"model": {"source": "image://reg/m:1"}})
    assert restricted_violations(good) == []
    breaks = {
        "hostNetwork": lambda t: t["spec"].update(hostNetwork=True),
        "hostPath": lambda t: t["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True),
        "allowPrivilegeEscalation": lambda t: t["spec"]["initContainers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "capabilities.drop": lambda t: t["spec"]["containers"][0]["securityContext"].pop("capabilities"),
        "capabilities.add": lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(
            add=["SYS_ADMIN"]
        ),
        "runAsNonRoot": lambda t: (
            t["spec"]["securityContext"].pop("runAsNonRoot"),
            t["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot"),
        ),
        "runAsUser 0": lambda t: t["spec"]["securityContext"].update(runAsUser=0),
        "seccompProfile": lambda t: (
            t["spec"]["securityContext"].pop("seccompProfile"),
            t["spec"]["containers"][0]["securityContext"].pop("seccompProfile"),
        ),
        "Unconfined": lambda t: t["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "hostPort": lambda t: t["spec"]["containers"][0]["ports"][0].update(hostPort=80),
        "procMount": lambda t: t["spec"]["containers"][0]["securityContext"].update(procMount="Unmasked"),
        "sysctl": lambda t: t["spec"]["securityContext"].update(
            sysctls=[{"name": "kernel.msgmax", "value": "1"}]
        ),
        "AppArmor": lambda t: (
            t["metadata"]
            .setdefault("annotations", {})
            .update({"container.apparmor.security.beta.kubernetes.io/worker": "unconfined"})
        ),
        "appArmorProfile": lambda t: t["spec"]["securityContext"].update(
            appArmorProfile={"type": "Unconfined"}
        ),
        "seLinuxOptions": lambda t: t["spec"]["securityContext"].update(seLinuxOptions={"type": "spc_t"}),
        "hostPID": lambda t: t["spec"].update(hostPID=True),
        "hostIPC": lambda t: t["spec"].update(hostIPC=True),
    }
    for rule, breaker in breaks.items():
        bad = copy.deepcopy(good)
        breaker(bad)
        assert restricted_violations(bad), rule


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_pod_is_restricted(example: Path) -> None:
    for document in yaml.safe_load_all(example.read_text()):
        if document and document.get("kind") == "ModelDeployment":
            for name, template in _templates(document["spec"]).items():
                assert restricted_violations(template) == [], name


@pytest.mark.parametrize("accelerator", ["cpu", "nvidia", "amd", "intel"])
def test_every_accelerator_source_and_tier_is_restricted(accelerator: str) -> None:
    for source in SOURCES:
        for tier in ({}, {"external": {"url": "redis://x:6379/0", "secretRef": {"name": "r"}}}):
            spec = {
                "model": {"source": source},
                "prefill": {"replicas": 1, "accelerator": accelerator},
                "decode": {"replicas": 2, "accelerator": accelerator},
                "kvTier": tier or {"managed": {}},
            }
            for name, template in _templates(spec).items():
                assert restricted_violations(template) == [], (source, name)
                pod = template["spec"]
                assert pod["securityContext"]["runAsUser"] != 0
                for container in pod["containers"] + pod.get("initContainers", []):
                    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_workers_write_only_to_their_volumes() -> None:
    pod = _worker({"model": {"source": "hf://org/m"}})["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {}
    assert "emptyDir" in volumes[mounts["/var/cache/tusk"]["name"]]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    for variable in ("HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "HOME"):
        assert env[variable].startswith(("/var/cache/tusk", "/tmp")), variable


def test_hf_downloads_are_bounded_or_shared() -> None:
    pod = _worker({"model": {"source": "hf://org/m", "cache": {"sizeLimit": "30Gi"}}})["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["emptyDir"] == {"sizeLimit": "30Gi"}
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "30Gi"

    shared = _worker({"model": {"source": "hf://org/m", "cache": {"persistentVolumeClaim": "hub"}}})["spec"]
    volumes = {v["name"]: v for v in shared["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hub"}}
    mounts = {m["name"]: m["mountPath"] for m in shared["containers"][0]["volumeMounts"]}
    assert mounts["hf-cache"] == "/var/cache/tusk/huggingface"
    assert "ephemeral-storage" not in (shared["containers"][0].get("resources") or {}).get("requests", {})


def test_image_source_path_is_an_argument_not_shell() -> None:
    path = '/weights"; rm -rf / #$(id)'
    pod = _worker({"model": {"source": "image://reg/m:1", "imagePath": path}})["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][0] == "cp" and "sh" not in init["command"]
    assert f"{path}/." in init["command"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["emptyDir"]["sizeLimit"] == "20Gi"
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "20Gi"


def test_role_fields_and_pod_template_override() -> None:
    spec = {
        "model": {"source": "tiny"},
        "decode": {
            "imagePullSecrets": [{"name": "reg"}],
            "serviceAccountName": "llm",
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
            "nodeSelector": {"pool": "a"},
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}
            ],
            "volumes": [{"name": "extra", "configMap": {"name": "x"}}],
            "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
            "env": [{"name": "A", "value": "1"}],
            "podTemplate": {
                "metadata": {
                    "annotations": {"sidecar.istio.io/inject": "false"},
                    "labels": {"tusk.dev/model": "x"},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 120,
                    "containers": [
                        {"name": "worker", "env": [{"name": "A", "value": "2"}], "args": ["--verbose"]},
                        {"name": "sidecar", "image": "busybox"},
                    ],
                    "enableServiceLinks": None,
                },
            },
        },
    }
    template = _worker(spec)
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "reg"}]
    assert pod["serviceAccountName"] == "llm" and pod["priorityClassName"] == "high"
    assert pod["runtimeClassName"] == "nvidia" and pod["nodeSelector"] == {"pool": "a"}
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "zone"
    assert {"name": "extra", "configMap": {"name": "x"}} in pod["volumes"]
    worker, sidecar = pod["containers"]
    assert {"name": "extra", "mountPath": "/extra"} in worker["volumeMounts"]
    # Merged by name: the worker keeps its command and probes, gains args, its env A is replaced.
    assert worker["command"][:2] == ["tusk", "worker"] and worker["args"] == ["--verbose"]
    assert [e["value"] for e in worker["env"] if e["name"] == "A"] == ["2"]
    assert sidecar == {"name": "sidecar", "image": "busybox"}
    assert pod["terminationGracePeriodSeconds"] == 120 and "enableServiceLinks" not in pod
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    # The selector labels survive any override.
    assert template["metadata"]["labels"]["tusk.dev/model"] == "llama"
    # Without the override nothing of it shows.
    plain = _worker({"model": {"source": "tiny"}})
    assert plain["spec"]["serviceAccountName"] == "default" and len(plain["spec"]["containers"]) == 1


def test_strategic_merge_deletes_list_items_by_key() -> None:
    base = {
        "containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}],
        "volumes": [{"name": "v"}],
    }
    patch = {"containers": [{"name": "a", "$patch": "delete"}], "volumes": [{"name": "w"}]}
    assert strategic_merge(base, patch) == {
        "containers": [{"name": "b", "image": "2"}],
        "volumes": [{"name": "v"}, {"name": "w"}],
    }


@pytest.mark.parametrize(
    ("role", "reason", "words"),
    [
        ({"volumes": [{"name": "cache", "emptyDir": {}}]}, "InvalidVolumes", "'cache'"),
        ({"podTemplate": {"metadata": "x"}}, "InvalidPodTemplate", "['metadata']"),
        ({"podTemplate": {"containers": []}}, "InvalidPodTemplate", "['containers']"),
        (
            {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]},
            "InvalidVolumes",
            "no volume named ['nope']",
        ),
    ],
)
def test_bad_role_fields_are_named_problems(role: dict, reason: str, words: str) -> None:
    problems = spec_problems(parse_spec({"model": {"source": "tiny"}, "decode": role}))
    assert [p.reason for p in problems] == [reason]
    assert words in problems[0].message and "spec.decode" in problems[0].message


def test_a_name_too_long_for_its_children_is_a_named_problem() -> None:
    from tusk.operator.preflight import MAX_NAME_LENGTH, name_problems

    assert name_problems("m" * MAX_NAME_LENGTH) == []
    (problem,) = name_problems("m" * (MAX_NAME_LENGTH + 1))
    assert problem.reason == "NameTooLong" and problem.blocking and "metadata.name" in problem.message
    children = desired_children(
        Owner("m" * MAX_NAME_LENGTH, "ns", "u"), parse_spec({"model": {"source": "tiny"}})
    )
    assert max(len(c["metadata"]["name"]) for c in children if c["kind"] == "Service") == 63

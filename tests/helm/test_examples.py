"""The example ModelDeployments (and the one in NOTES.txt) are accepted by the CRD and the operator."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml
from chartkit import CHART, EXAMPLES_DIR, NAMESPACE, RELEASE, VALUES_DIR
from tusk.operator.spec import parse_spec

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def _load(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if d["kind"] == "ModelDeployment"]


def test_there_are_cpu_nvidia_and_amd_examples():
    accelerators = {
        role["accelerator"]
        for p in EXAMPLES
        for md in _load(p)
        for role in (md["spec"]["prefill"], md["spec"]["decode"])
    }
    assert {"cpu", "nvidia", "amd"} <= accelerators


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_matches_the_crd_and_parses(path, validate_modeldeployment):
    mds = _load(path)
    assert mds, f"{path.name} holds no ModelDeployment"
    for md in mds:
        assert md["apiVersion"] == "tusk.dev/v1alpha1"
        validate_modeldeployment(md)


def test_tiny_example_is_disaggregated_on_cpu_with_the_tiny_model():
    (md,) = _load(EXAMPLES_DIR / "tiny.yaml")
    assert md["metadata"]["name"] == "tiny"
    spec = parse_spec(md["spec"])
    assert spec.model.source == "tiny"
    assert (spec.prefill.replicas, spec.decode.replicas) == (1, 1)
    assert spec.prefill.accelerator == spec.decode.accelerator == "cpu"
    assert "tiny" in spec.served_model_names


@pytest.mark.parametrize(
    ("name", "image"), [("nvidia-llama-3.1-8b.yaml", "cuda"), ("amd-llama-3.1-8b.yaml", "rocm")]
)
def test_gpu_examples_run_llama_8b_two_prefill_four_decode(name, image):
    (md,) = _load(EXAMPLES_DIR / name)
    spec = parse_spec(md["spec"])
    assert spec.model.source.startswith("hf://meta-llama/Llama-3.1-8B")
    assert (spec.prefill.replicas, spec.decode.replicas) == (2, 4)
    assert spec.image and f"tusk-worker-{image}:" in spec.image
    # One worker Dockerfile builds every flavor (--build-arg ACCELERATOR=<flavor>).
    assert (EXAMPLES_DIR.parent / "docker" / "worker.Dockerfile").is_file()


def test_the_validator_catches_typos_and_bad_values(validate_modeldeployment):
    (md,) = _load(EXAMPLES_DIR / "tiny.yaml")
    for path, value, message in (
        (("spec", "decode", "replica"), 2, "Additional properties"),
        (("spec", "model", "source"), "s3://bucket/model", "does not match"),
        (("spec", "prefill", "accelerator"), "tpu", "is not one of"),
    ):
        broken = yaml.safe_load(yaml.safe_dump(md))
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(AssertionError, match=message):
            validate_modeldeployment(broken)


def test_the_crd_cel_rules_are_enforced(validate_modeldeployment):
    (md,) = _load(EXAMPLES_DIR / "tiny.yaml")
    for change, message in (
        ({"decode": {"acceleratorsPerReplica": 2}}, "maximum of 1"),
        ({"kvTier": {"managed": {}, "external": {"url": "redis://cache:6379"}}}, "either external"),
        ({"kvTier": {"managed": {"replicas": 2}}}, "maximum"),
        ({"model": {"source": "tiny", "tokenSecretRef": {"name": "hf-token"}}}, "only used with hf://"),
        ({"routing": {"policy": "nonexistent"}}, "is not one of"),
        ({"engine": {"kernelBackend": "cuda-magic"}}, "is not one of"),
    ):
        broken = yaml.safe_load(yaml.safe_dump(md))
        broken["spec"].update(change)
        with pytest.raises(AssertionError, match=message):
            validate_modeldeployment(broken)
    long_name = yaml.safe_load(yaml.safe_dump(md))
    long_name["metadata"]["name"] = "x" * 60
    with pytest.raises(AssertionError, match="at most 48 characters"):
        validate_modeldeployment(long_name)


def test_notes_example_is_a_valid_modeldeployment(tools, validate_modeldeployment):
    out = tools.run(
        tools.helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
        "--values", str(VALUES_DIR / "managed-tier.yaml"),
    ).stdout  # fmt: skip
    notes = out.split("NOTES:", 1)[1]
    block = re.search(r"<<'YAML'\n(.*?)\n\s*YAML\n", notes, re.S)
    assert block, notes
    md = yaml.safe_load(textwrap.dedent(block.group(1)))
    validate_modeldeployment(md)
    assert md["spec"]["model"]["source"] == "tiny"

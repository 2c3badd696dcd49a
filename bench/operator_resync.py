"""Steady-state resync cost: the operator's subset diff vs always patching every child.

A resync pass over N ModelDeployments whose children already match runs against the in-process
Kubernetes emulator (tests/operator/kube_emulator.py). The baseline patches every child on every
pass, as a naive create-or-update controller would; tusk's apply compares first and writes nothing.
Prints one JSON line last: objects, seconds per pass for both, writes per pass, and the ratio.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import kmock
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "operator"))

from kube_emulator import ClusterEmulator, declare_resources  # noqa: E402
from tusk.operator import apply  # noqa: E402
from tusk.operator.desired import Owner, desired_children  # noqa: E402
from tusk.operator.kube import Kube, load_api_client  # noqa: E402
from tusk.operator.spec import parse_spec  # noqa: E402

N = int(os.environ.get("BENCH_OBJECTS", "30"))
PASSES = int(os.environ.get("BENCH_PASSES", "3"))


async def one_pass(kube: Kube, owners: list[Owner], spec, always_patch: bool) -> tuple[float, int]:
    writes = 0
    start = time.perf_counter()
    for owner in owners:
        children = desired_children(owner, spec)
        if always_patch:
            with mock.patch.object(
                apply,
                "drift_patch",
                side_effect=lambda d, live: {"spec": d.get("spec"), "data": d.get("data")},
            ):
                result = await apply.apply_children(kube, children, owner.uid)
        else:
            result = await apply.apply_children(kube, children, owner.uid)
        writes += len(result.created) + len(result.repaired)
    return time.perf_counter() - start, writes


async def main() -> None:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "kubeconfig"
            url = str(server.url).rstrip("/")
            config.write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "current-context": "b",
                        "clusters": [{"name": "b", "cluster": {"server": url}}],
                        "users": [{"name": "b", "user": {"token": "t"}}],
                        "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b"}}],
                    }
                )
            )
            os.environ["KUBECONFIG"] = str(config)
            kube = Kube(await asyncio.to_thread(load_api_client))
        spec = parse_spec({"model": {"source": "tiny"}, "prefill": {"replicas": 1}})
        owners = [Owner(f"m{i:03d}", "bench", f"uid-{i}") for i in range(N)]
        await one_pass(kube, owners, spec, always_patch=False)  # create everything once
        results = {}
        for name, always in (("baseline_always_patch", True), ("tusk_subset_diff", False)):
            times, writes = [], 0
            for _ in range(PASSES):
                seconds, writes = await one_pass(kube, owners, spec, always)
                times.append(seconds)
            results[name] = {"seconds_per_pass": round(min(times), 3), "writes_per_pass": writes}
            print(f"{name}: {results[name]}", file=sys.stderr)
    base, ours = results["baseline_always_patch"], results["tusk_subset_diff"]
    print(
        json.dumps(
            {
                "bench": "operator_resync",
                "objects": N,
                "children_per_object": 9,
                "baseline_always_patch_s": base["seconds_per_pass"],
                "tusk_subset_diff_s": ours["seconds_per_pass"],
                "baseline_writes": base["writes_per_pass"],
                "tusk_writes": ours["writes_per_pass"],
                "speedup": round(base["seconds_per_pass"] / max(ours["seconds_per_pass"], 1e-9), 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

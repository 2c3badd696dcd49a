"""Steady-state resync cost: the operator's subset diff vs always patching every child.

A resync pass over N ModelDeployments whose children already match runs against the in-process
Kubernetes emulator (tests/operator/kube_emulator.py), which stores quantities canonicalised as the
API server does; the spec writes them as users do ("0.5", "2048Mi"). Three policies in the same run:
the baseline patches every child on every pass, as a naive create-or-update controller would; the
string compare is the operator's previous diff (a quantity in another spelling is drift); tusk's apply
compares quantities by value and writes nothing. Prints one JSON line last.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def _policy(name: str):
    if name == "baseline_always_patch":
        return mock.patch.object(
            apply, "drift_patch", side_effect=lambda d, live: {"spec": d.get("spec"), "data": d.get("data")}
        )
    if name == "string_compare":  # "0.5" != "500m": what the operator did before comparing by value
        return mock.patch.object(apply, "quantity_equal", side_effect=lambda d, live: str(d) == str(live))
    return contextlib.nullcontext()


async def one_pass(kube: Kube, owners: list[Owner], spec, policy: str) -> tuple[float, int]:
    writes = 0
    start = time.perf_counter()
    for owner in owners:
        children = desired_children(owner, spec)
        with _policy(policy):
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
        resources = {"requests": {"cpu": "0.5", "memory": "2048Mi"}, "limits": {"memory": "1.5Gi"}}
        spec = parse_spec(
            {
                "model": {"source": "tiny"},
                "prefill": {"replicas": 1, "resources": resources},
                "decode": {"replicas": 1, "resources": resources},
                "kvTier": {"managed": {"memory": "1024Mi"}},
            }
        )
        owners = [Owner(f"m{i:03d}", "bench", f"uid-{i}") for i in range(N)]
        await one_pass(kube, owners, spec, "tusk_subset_diff")  # create everything once
        results = {}
        for name in ("baseline_always_patch", "string_compare", "tusk_subset_diff"):
            times, writes = [], 0
            for _ in range(PASSES):
                seconds, writes = await one_pass(kube, owners, spec, name)
                times.append(seconds)
            results[name] = {"seconds_per_pass": round(min(times), 3), "writes_per_pass": writes}
            print(f"{name}: {results[name]}", file=sys.stderr)
    base, strings, ours = (
        results[k] for k in ("baseline_always_patch", "string_compare", "tusk_subset_diff")
    )
    print(
        json.dumps(
            {
                "bench": "operator_resync",
                "objects": N,
                "children_per_object": len(desired_children(owners[0], spec)),
                "baseline_always_patch_s": base["seconds_per_pass"],
                "string_compare_s": strings["seconds_per_pass"],
                "tusk_subset_diff_s": ours["seconds_per_pass"],
                "baseline_writes": base["writes_per_pass"],
                "string_compare_writes": strings["writes_per_pass"],
                "tusk_writes": ours["writes_per_pass"],
                "speedup": round(base["seconds_per_pass"] / max(ours["seconds_per_pass"], 1e-9), 2),
                "speedup_vs_string_compare": round(
                    strings["seconds_per_pass"] / max(ours["seconds_per_pass"], 1e-9), 2
                ),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

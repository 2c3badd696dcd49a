"""Generates the gRPC Python code from ``worker.proto``.

The generated modules are build outputs: they are not committed, the package build produces them
(``setup.py``), and importing ``tusk.protocol`` regenerates them when the proto changed and
grpcio-tools is available. A stamp holding the proto's digest tells whether they are current.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parent
PROTO = PROTOCOL_DIR / "worker.proto"
STAMP = PROTOCOL_DIR / "worker_pb2.stamp"
OUTPUTS = ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")


def proto_digest() -> str:
    return hashlib.sha256(PROTO.read_bytes()).hexdigest()


def is_current(directory: Path = PROTOCOL_DIR) -> bool:
    stamp = directory / STAMP.name
    return (
        all((directory / name).exists() for name in OUTPUTS)
        and stamp.exists()
        and stamp.read_text().strip() == proto_digest()
    )


def generate(out_root: Path | None = None) -> Path:
    """Run protoc; ``out_root`` is the folder that holds ``tusk/`` (default: this source tree)."""
    from grpc_tools import protoc  # build-time dependency only

    include_root = PROTOCOL_DIR.parent.parent  # the folder holding tusk/
    out_root = out_root or include_root
    target = out_root / "tusk" / "protocol"
    target.mkdir(parents=True, exist_ok=True)
    proto_include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{include_root}",
        f"-I{proto_include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO.relative_to(include_root)),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    (target / STAMP.name).write_text(proto_digest() + "\n")
    return target


if __name__ == "__main__":
    print(f"generated {generate()}", file=sys.stderr)

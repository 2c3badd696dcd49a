"""The router <-> worker gRPC protocol (generated from ``worker.proto``).

``pb`` holds the messages and ``rpc`` the service stubs. Code is regenerated on import when the
proto is newer than the generated files and grpcio-tools is installed (a source checkout); an
installed package ships generated code built by ``setup.py``.
"""

from __future__ import annotations

from tusk.protocol import build as _build

if not _build.is_current():
    try:
        _build.generate()
    except ImportError as exc:  # no grpcio-tools: only fatal if nothing was ever generated
        if not all((_build.PROTOCOL_DIR / name).exists() for name in _build.OUTPUTS):
            raise ImportError(
                "tusk's gRPC code is not generated; install grpcio-tools and run "
                "`python -m tusk.protocol.build`"
            ) from exc

from tusk.protocol import worker_pb2 as pb  # noqa: E402
from tusk.protocol import worker_pb2_grpc as rpc  # noqa: E402

__all__ = ["pb", "rpc"]

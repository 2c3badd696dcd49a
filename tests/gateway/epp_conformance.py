"""A reusable endpoint-picker conformance kit: drive any EPP's ext_proc directly.

No public conformance suite for the Gateway API Inference Extension's endpoint-picker protocol
exists yet (GIE issue #753). This module holds the protocol's rules as assertions over a plain
``ExternalProcessor`` gRPC stream, independent of tusk: point ``Exchange`` at any picker's
address. ``tests/gateway/test_epp_conformance.py`` runs it against ``tusk epp``.

Rules checked (proposal 004):
* the header ``x-gateway-destination-endpoint`` and dynamic metadata ``envoy.lb`` carry the same
  value, a comma-separated list of ``ip:port``, primary first;
* with a subset hint every returned endpoint is in the subset; an empty or ineligible subset
  gives an ImmediateResponse 503;
* no ready endpoint gives 503, shedding gives 429;
* in FULL_DUPLEX_STREAMED mode the body comes back unchanged and ends with end_of_stream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import struct_pb2

HEADER = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
TIMEOUT_S = 20.0  # a picker that stalls fails the check instead of hanging the suite


@dataclass
class Result:
    responses: list[ext.ProcessingResponse] = field(default_factory=list)

    @property
    def immediate_status(self) -> int | None:
        for r in self.responses:
            if r.HasField("immediate_response"):
                return int(r.immediate_response.status.code)
        return None

    @property
    def immediate_body(self) -> dict:
        for r in self.responses:
            if r.HasField("immediate_response"):
                return json.loads(r.immediate_response.body or b"{}")
        return {}

    def _mutations(self):  # noqa: ANN202
        for r in self.responses:
            for kind in ("request_headers", "request_body"):
                if r.HasField(kind):
                    common = getattr(r, kind).response
                    for option in common.header_mutation.set_headers:
                        yield r, option

    @property
    def header_value(self) -> str | None:
        for _, option in self._mutations():
            if option.header.key.lower() == HEADER:
                return option.header.raw_value.decode() or option.header.value
        return None

    @property
    def metadata_value(self) -> str | None:
        for r in self.responses:
            namespace = r.dynamic_metadata.fields.get(LB_NAMESPACE)
            if namespace is not None and HEADER in namespace.struct_value.fields:
                return namespace.struct_value.fields[HEADER].string_value
        return None

    @property
    def endpoints(self) -> list[str]:
        value = self.header_value
        return value.split(",") if value else []

    @property
    def echoed_body(self) -> tuple[bytes, bool]:
        """(request body streamed back, whether its last chunk had end_of_stream)."""
        parts, eos = [], False
        for r in self.responses:
            if r.HasField("request_body"):
                streamed = r.request_body.response.body_mutation.streamed_response
                parts.append(streamed.body)
                eos = eos or streamed.end_of_stream
        return b"".join(parts), eos


def _headers(
    path: str, extra: dict[str, str] | None = None, *, end_of_stream: bool = False
) -> ext.HttpHeaders:
    values = {":method": "POST" if not end_of_stream else "GET", ":path": path, ":authority": "gateway"}
    values["content-type"] = "application/json"
    values.update(extra or {})
    headers = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
    )
    return ext.HttpHeaders(headers=headers, end_of_stream=end_of_stream)


def subset_metadata(endpoints: list[str]) -> base_pb2.Metadata:
    value = struct_pb2.Struct()
    value.update({SUBSET_KEY: endpoints})
    return base_pb2.Metadata(filter_metadata={SUBSET_NAMESPACE: value})


def served_metadata(endpoint: str) -> base_pb2.Metadata:
    value = struct_pb2.Struct()
    value.update({SERVED_KEY: endpoint})
    return base_pb2.Metadata(filter_metadata={LB_NAMESPACE: value})


class Exchange:
    """One ext_proc stream to a picker; ``send`` a message and read the answers it triggers."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def run(
        self,
        body: bytes | None,
        *,
        path: str = "/v1/chat/completions",
        headers: dict[str, str] | None = None,
        subset: list[str] | None = None,
        mode: int = FULL_DUPLEX,
        chunks: int = 1,
        served: str | None = None,
        raw_messages: list[ext.ProcessingRequest] | None = None,
    ) -> Result:
        """Send a whole request (headers, body in ``chunks`` pieces) and, if the picker routed
        it, a response (headers with the ``served`` endpoint, a body); return every answer."""
        messages: list[ext.ProcessingRequest] = []
        if raw_messages is not None:
            messages = raw_messages
        else:
            first = ext.ProcessingRequest(
                request_headers=_headers(path, headers, end_of_stream=body is None),
                protocol_config=ext.ProtocolConfiguration(request_body_mode=mode, response_body_mode=mode),
            )
            if subset is not None:
                first.metadata_context.CopyFrom(subset_metadata(subset))
            messages.append(first)
            if body is not None:
                size = max(1, -(-len(body) // chunks))
                pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
                for i, piece in enumerate(pieces):
                    messages.append(
                        ext.ProcessingRequest(
                            request_body=ext.HttpBody(body=piece, end_of_stream=i == len(pieces) - 1)
                        )
                    )
        result = Result()
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = ext_grpc.ExternalProcessorStub(channel)
            queue: asyncio.Queue[ext.ProcessingRequest | None] = asyncio.Queue()
            for m in messages:
                queue.put_nowait(m)

            async def requests():  # noqa: ANN202
                while (item := await queue.get()) is not None:
                    yield item

            call = stub.Process(requests(), timeout=TIMEOUT_S)
            routed = False
            pending_response = raw_messages is None
            try:
                async for response in call:
                    result.responses.append(response)
                    if response.HasField("immediate_response"):
                        break
                    if not routed and result.header_value is not None:
                        routed = True
                    done_request = _request_complete(result, mode, body is None)
                    if routed and done_request and pending_response:
                        pending_response = False
                        reply = ext.ProcessingRequest(
                            response_headers=ext.HttpHeaders(headers=base_pb2.HeaderMap())
                        )
                        if served:
                            reply.metadata_context.CopyFrom(served_metadata(served))
                        queue.put_nowait(reply)
                        queue.put_nowait(
                            ext.ProcessingRequest(response_body=ext.HttpBody(body=b"{}", end_of_stream=True))
                        )
                    if any(r.HasField("response_body") for r in result.responses):
                        break
                    if raw_messages is not None and len(result.responses) >= len(raw_messages):
                        break
            finally:
                queue.put_nowait(None)
                call.cancel()
        return result


def _request_complete(result: Result, mode: int, no_body: bool) -> bool:
    if no_body:
        return True
    if mode == FULL_DUPLEX:
        return result.echoed_body[1]
    return any(r.HasField("request_body") for r in result.responses)


# -- the protocol's rules, as reusable assertions ----------------------------------------------------


def assert_routed(result: Result, allowed: set[str]) -> list[str]:
    assert result.immediate_status is None, result.immediate_body
    header, metadata = result.header_value, result.metadata_value
    assert header, "no x-gateway-destination-endpoint header"
    assert header == metadata, f"header {header!r} != metadata {metadata!r}"
    endpoints = header.split(",")
    assert len(endpoints) == len(set(endpoints)), "an endpoint is listed twice"
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        assert host and port.isdigit(), f"not ip:port: {endpoint!r}"
        assert endpoint in allowed, f"{endpoint} is not an allowed endpoint"
    return endpoints


def assert_immediate(result: Result, status: int) -> None:
    assert result.immediate_status == status, (result.immediate_status, result.responses)
    assert result.header_value is None, "a refused request must not also be routed"

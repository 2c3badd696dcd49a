"""The Gateway API Inference Extension's endpoint-picker protocol, as ext_proc messages.

Names and rules (proposal 004, "Endpoint Picker Protocol"):

* the data plane MAY restrict the choice with filter metadata
  ``envoy.lb.subset_hint`` -> ``x-gateway-destination-endpoint-subset`` (a list of ``ip:port``);
  an empty or fully ineligible subset is a 503;
* the picker answers with the header ``x-gateway-destination-endpoint`` AND the same value in
  dynamic metadata ``envoy.lb`` -> ``x-gateway-destination-endpoint``: ``ip:port`` or an ordered,
  comma-separated list (primary first, then fallbacks); the two MUST be equal;
* no ready endpoint: ImmediateResponse 503; a request to shed: ImmediateResponse 429;
* on the response, the data plane reports the endpoint that served in metadata
  ``envoy.lb`` -> ``x-gateway-destination-endpoint-served``.

Everything here is pure message building and reading, so the conformance tests and the service
share one definition of the wire format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
BODY_CHUNK_BYTES = 64 << 10  # streamed body messages back to Envoy stay well under gRPC limits


def header_map(headers: ext.HttpHeaders) -> dict[str, str]:
    """Lower-cased header names to values (Envoy sends ``raw_value``; older ones ``value``)."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key.lower()] = value
    return out


def subset_hint(request: ext.ProcessingRequest) -> list[str] | None:
    """The endpoints the data plane allows, or None when it sets no subset."""
    namespace = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if namespace is None or SUBSET_KEY not in namespace.fields:
        return None
    value = namespace.fields[SUBSET_KEY]
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values if v.string_value]
    if value.HasField("string_value"):  # tolerate "a,b" as well as a list
        return [p.strip() for p in value.string_value.split(",") if p.strip()]
    return []


def served_endpoint(request: ext.ProcessingRequest) -> str | None:
    namespace = request.metadata_context.filter_metadata.get(LB_NAMESPACE)
    if namespace is None or SERVED_KEY not in namespace.fields:
        return None
    return namespace.fields[SERVED_KEY].string_value or None


def destination_value(endpoints: Iterable[str]) -> str:
    return ",".join(endpoints)


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _destination_metadata(value: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: value}})
    return metadata


def routed_common(value: str) -> ext.CommonResponse:
    """The request mutation that carries the pick (route cache cleared so routes may match it)."""
    return ext.CommonResponse(
        header_mutation=ext.HeaderMutation(set_headers=[_set_header(DESTINATION_HEADER, value)]),
        clear_route_cache=True,
    )


def routed_headers_response(value: str) -> ext.ProcessingResponse:
    return ext.ProcessingResponse(
        request_headers=ext.HeadersResponse(response=routed_common(value)),
        dynamic_metadata=_destination_metadata(value),
    )


def routed_body_response(value: str) -> ext.ProcessingResponse:
    """For BUFFERED request bodies: the headers are still held, so the body answer mutates them."""
    return ext.ProcessingResponse(
        request_body=ext.BodyResponse(response=routed_common(value)),
        dynamic_metadata=_destination_metadata(value),
    )


def streamed_body(
    body: bytes, *, end_of_stream: bool, response: bool = False
) -> list[ext.ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: the picker hands the (unchanged) body back in chunks."""
    chunks = [body[i : i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        last = end_of_stream and i == len(chunks) - 1
        mutation = ext.BodyMutation(
            streamed_response=ext.StreamedBodyResponse(body=chunk, end_of_stream=last)
        )
        body_response = ext.BodyResponse(response=ext.CommonResponse(body_mutation=mutation))
        if response:
            out.append(ext.ProcessingResponse(response_body=body_response))
        else:
            out.append(ext.ProcessingResponse(request_body=body_response))
    return out


def continue_request_headers() -> ext.ProcessingResponse:
    return ext.ProcessingResponse(request_headers=ext.HeadersResponse())


def continue_response_headers() -> ext.ProcessingResponse:
    return ext.ProcessingResponse(response_headers=ext.HeadersResponse())


def continue_body(response: bool) -> ext.ProcessingResponse:
    if response:
        return ext.ProcessingResponse(response_body=ext.BodyResponse())
    return ext.ProcessingResponse(request_body=ext.BodyResponse())


def continue_trailers(response: bool) -> ext.ProcessingResponse:
    if response:
        return ext.ProcessingResponse(response_trailers=ext.TrailersResponse())
    return ext.ProcessingResponse(request_trailers=ext.TrailersResponse())


def immediate(
    status: int, message: str, code: str, *, type_: str = "invalid_request_error"
) -> ext.ProcessingResponse:
    """An OpenAI-style JSON error sent by Envoy in place of the upstream's answer."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = ext.HeaderMutation(set_headers=[_set_header("content-type", "application/json")])
    return ext.ProcessingResponse(
        immediate_response=ext.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=headers,
            body=body.encode(),
            details=f"tusk_epp_{code}",
        )
    )

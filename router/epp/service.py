"""Envoy's ``envoy.service.ext_proc.v3.ExternalProcessor`` as an endpoint picker.

One ``Process`` stream is one HTTP request. Request body modes:

* ``FULL_DUPLEX_STREAMED`` (what the Gateway API Inference Extension uses): the picker holds the
  request headers' answer until the whole body has arrived, then answers the headers with the
  pick and streams the body back unchanged. The response body is streamed back as it comes.
* ``BUFFERED``: headers are answered at once; the single body message's answer carries the pick
  (Envoy still holds the headers then).
* no body (a GET, or end of stream on the headers): the pick is by load alone.

Anything out of order, a body that is not JSON, an unknown model, no eligible endpoint or a shed
request ends in an ``ImmediateResponse`` with the matching status, never in a silent stall.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from tusk.router.epp import protocol
from tusk.router.epp.picker import EndpointPicker, Pick, PickError

log = logging.getLogger("tusk.router.epp")

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


class _Exchange:
    """State of one HTTP request as the ext_proc stream reveals it."""

    def __init__(self, picker: EndpointPicker, max_body_bytes: int) -> None:
        self.picker = picker
        self.max_body_bytes = max_body_bytes
        self.request_mode = FULL_DUPLEX
        self.response_mode = FULL_DUPLEX
        self.headers: dict[str, str] | None = None
        self.subset: list[str] | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.pick: Pick | None = None
        self.failed = False  # an immediate response was sent: the exchange is over

    async def handle(self, req: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        if req.HasField("protocol_config"):
            self.request_mode = req.protocol_config.request_body_mode
            self.response_mode = req.protocol_config.response_body_mode
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(req)
        if kind == "request_body":
            return await self._request_body(req.request_body)
        if kind == "request_trailers":
            if self.headers is None:
                return self._malformed("request trailers before request headers")
            out = [] if self.pick is not None else await self._route(end_of_stream=False)
            return out + [protocol.continue_trailers(response=False)]
        if self.pick is None:
            return self._malformed(f"{kind} before the request was routed")
        if kind == "response_headers":
            self.pick.served(protocol.served_endpoint(req))
            if req.response_headers.end_of_stream:
                self._finish()
            return [protocol.continue_response_headers()]
        if kind == "response_body":
            chunk = req.response_body
            if chunk.end_of_stream:
                self._finish()
            if self.response_mode == FULL_DUPLEX:
                return protocol.streamed_body(chunk.body, end_of_stream=chunk.end_of_stream, response=True)
            return [protocol.continue_body(response=True)]
        if kind == "response_trailers":
            self._finish()
            return [protocol.continue_trailers(response=True)]
        return self._malformed(f"unexpected ext_proc message {kind!r}")

    async def _request_headers(self, req: ext.ProcessingRequest) -> list[ext.ProcessingResponse]:
        if self.headers is not None:
            return self._malformed("request headers sent twice")
        self.headers = protocol.header_map(req.request_headers)
        self.subset = protocol.subset_hint(req)
        no_body = (
            req.request_headers.end_of_stream or self.request_mode == processing_mode_pb2.ProcessingMode.NONE
        )
        if no_body:
            return await self._route(end_of_stream=True, with_body=False)
        if self.request_mode == FULL_DUPLEX:
            return []  # answered once the body is in
        return [protocol.continue_request_headers()]

    async def _request_body(self, chunk: ext.HttpBody) -> list[ext.ProcessingResponse]:
        if self.headers is None:
            return self._malformed("request body before request headers")
        if self.pick is not None:
            return self._malformed("request body after the end of the request")
        self.size += len(chunk.body)
        if self.size > self.max_body_bytes:
            return self._fail(
                PickError(
                    413,
                    f"Request body exceeds the limit of {self.max_body_bytes} bytes.",
                    "request_too_large",
                )
            )
        self.body.append(chunk.body)
        if not chunk.end_of_stream:
            if self.request_mode == FULL_DUPLEX:
                return []
            return [protocol.continue_body(response=False)]
        return await self._route(end_of_stream=True)

    async def _route(self, *, end_of_stream: bool, with_body: bool = True) -> list[ext.ProcessingResponse]:
        assert self.headers is not None
        raw = b"".join(self.body)
        try:
            self.pick = await self.picker.pick(self.headers, raw, self.subset)
        except PickError as exc:
            return self._fail(exc)
        except Exception:  # noqa: BLE001 - a bug must answer Envoy, not leave it waiting
            log.exception("endpoint pick failed")
            return self._fail(PickError(500, "The endpoint picker failed.", "internal_error"))
        value = protocol.destination_value(self.pick.endpoints)
        if not with_body:
            return [protocol.routed_headers_response(value)]
        if self.request_mode == FULL_DUPLEX:
            return [protocol.routed_headers_response(value)] + protocol.streamed_body(
                raw, end_of_stream=end_of_stream
            )
        return [protocol.routed_body_response(value)]

    def _fail(self, exc: PickError) -> list[ext.ProcessingResponse]:
        self.failed = True
        type_ = "server_error" if exc.status >= 500 else "invalid_request_error"
        if exc.status == 429:
            type_ = "rate_limit_error"
        return [protocol.immediate(exc.status, exc.message, exc.code, type_=type_)]

    def _malformed(self, what: str) -> list[ext.ProcessingResponse]:
        log.warning("malformed ext_proc stream: %s", what)
        return self._fail(
            PickError(400, f"Malformed external processing stream: {what}.", "malformed_ext_proc")
        )

    def _finish(self) -> None:
        if self.pick is not None:
            self.pick.release()

    def close(self) -> None:
        if self.pick is not None:
            self.pick.release()


class ExternalProcessor(ext_grpc.ExternalProcessorServicer):
    def __init__(self, picker: EndpointPicker, max_body_bytes: int) -> None:
        self.picker = picker
        self.max_body_bytes = max_body_bytes

    async def Process(
        self, request_iterator: AsyncIterator[ext.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ext.ProcessingResponse]:
        exchange = _Exchange(self.picker, self.max_body_bytes)
        try:
            async for req in request_iterator:
                for response in await exchange.handle(req):
                    yield response
                if exchange.failed:
                    return  # an immediate response ends the exchange
        finally:
            exchange.close()

"""OTLP/gRPC receiver (grpc.aio): ``opentelemetry.proto.collector.trace.v1.TraceService/Export``.

The method is registered with a raw-bytes deserializer so an undecodable message is answered
INVALID_ARGUMENT (not INTERNAL). Codes: UNAUTHENTICATED (token), INVALID_ARGUMENT (undecodable),
RESOURCE_EXHAUSTED (over the size cap, from grpc itself), UNAVAILABLE + ``google.rpc.retryinfo-bin``
when the write queue is full; OK with ``partial_success`` when spans were rejected.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from . import metrics
from .decode import DecodeFailure
from .ingest import Ingestor

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_RETRY_INFO = RetryInfo(retry_delay=Duration(seconds=1)).SerializeToString()


def build_server(
    ingestor: Ingestor, host: str, port: int, max_body_bytes: int
) -> tuple[grpc.aio.Server, int]:
    """A started-later grpc.aio server bound to ``host:port``; returns (server, bound port)."""

    async def export(raw: bytes, context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        if not ingestor.authorized(md.get("authorization")):
            metrics.SPANS_DROPPED.labels("unauthenticated").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        try:
            outcome = ingestor.submit_body(raw, "grpc")
        except DecodeFailure as exc:
            metrics.SPANS_DROPPED.labels("undecodable").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not outcome.accepted:
            context.set_trailing_metadata((("google.rpc.retryinfo-bin", _RETRY_INFO),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, outcome.error)
        resp = ExportTraceServiceResponse()
        if outcome.rejected:
            resp.partial_success.rejected_spans = outcome.rejected
            resp.partial_success.error_message = outcome.error
        return resp

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export,
                request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_body_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound

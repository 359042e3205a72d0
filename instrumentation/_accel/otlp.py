"""OTLP span export with the native encoder: the SDK's gRPC and HTTP/protobuf exporters,
unchanged (endpoint, headers, TLS, compression, timeouts, retries come from them and the
standard ``OTEL_*`` variables), except that a batch is serialized by ``hoptrace_native``
(about ten times cheaper than building protobuf objects in Python). Without hoptrace_native
(other platforms, images built without Rust) the SDK's own encoder is used; both give the
same bytes (tests/instrumentation/test_native_encode.py).

The private parts: the gRPC exporter's ``_stub`` / ``_initialize_channel_and_stub`` /
``_translate_data``, the HTTP exporter's ``_client`` / ``_metrics`` / ``_max_request_size`` and
``_common._is_request_too_large`` (tested versions: ``hoptrace.instrumentation._accel.TESTED``;
otherwise ``tracing`` uses the SDK's exporters as they are)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from hoptrace.contract import conventions as c

try:  # the Rust extension (native/); optional
    import hoptrace_native as _native
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _native = None

log = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def native_encoder_available() -> bool:
    """True when batches are serialized by hoptrace_native."""
    return _native is not None


def sdk_encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The SDK's encoder: spans -> serialized ExportTraceServiceRequest."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializePartialToString()


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """Spans -> serialized ExportTraceServiceRequest (native when available). A batch the
    native encoder rejects goes through the SDK's encoder, which decides (and raises) as it
    always did."""
    if _native is not None:
        try:
            return _native.encode_spans(spans)
        except ValueError:
            log.debug("tracing: native encoder rejected a batch; using the SDK's", exc_info=True)
    return sdk_encode_request(spans)


def _identity(body: bytes) -> bytes:
    return body


class _RawTraceServiceStub:
    """TraceService stub whose Export takes the request already serialized."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        self.Export = channel.unary_unary(  # noqa: N815 - the gRPC method name
            EXPORT_METHOD,
            request_serializer=_identity,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def grpc_exporter(**kwargs: Any) -> SpanExporter:
    """The SDK's OTLP/gRPC span exporter sending natively encoded request bytes."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class NativeGrpcSpanExporter(OTLPSpanExporter):
        _last: tuple[object, bytes] | None = None

        def _initialize_channel_and_stub(self) -> None:  # also runs on reconnect
            self._stub = _RawTraceServiceStub  # type: ignore[assignment]
            super()._initialize_channel_and_stub()

        def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
            last = self._last  # the SDK re-translates the same batch on each retry
            if last is not None and last[0] is data:
                return last[1]
            body = encode_request(data)
            self._last = (data, body)
            return body

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                return super().export(spans)
            finally:
                self._last = None

    return NativeGrpcSpanExporter(**kwargs)


def http_exporter(**kwargs: Any) -> SpanExporter:
    """The SDK's OTLP/HTTP span exporter posting natively encoded request bytes (its own
    export path, size limit, retries and metrics; only the encoding differs)."""
    from opentelemetry.exporter.otlp.proto.http import _common
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class NativeHttpSpanExporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            client = getattr(self, "_client", None)
            metrics = getattr(self, "_metrics", None)
            limit = getattr(self, "_max_request_size", None)
            too_large = getattr(_common, "_is_request_too_large", None)
            if None in (client, metrics, too_large) or self._shutdown:
                return super().export(spans)  # another SDK version: its own path
            with metrics.export_operation(len(spans)) as result:
                try:
                    body = encode_request(spans)
                except Exception as error:  # noqa: BLE001 - as the SDK: a failed export
                    log.error("Failed to encode span batch: %s", error)
                    result.error = error
                    return SpanExportResult.FAILURE
                if too_large(body, limit):
                    log.warning(
                        "Dropping span batch: serialized size %d bytes exceeds "
                        "max_request_size %d bytes.",
                        len(body),
                        limit,
                    )
                    result.error = _common.RequestPayloadTooLargeError(
                        f"Serialized span request size {len(body)} bytes exceeds "
                        f"max_request_size {limit} bytes."
                    )
                    return SpanExportResult.FAILURE
                sent = client.export(body)
                if not sent.success:
                    result.error = sent.error
                    code = sent.status_code
                    result.error_attrs = {c.HTTP_STATUS_KEYS[0]: code} if code is not None else None
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return NativeHttpSpanExporter(**kwargs)

"""Builders for OTLP requests and a collector-on-free-ports fixture helper."""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

STEPS = ["payment.confirmed", "purchase.created", "trainer.allocated", "session.created"]
SERVICES = ["payment-service", "purchase-worker", "allocation-worker", "session-worker"]


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def step_span(
    cid: str,
    step_index: int,
    *,
    start_ns: int | None = None,
    duration_ms: int = 5,
    outcome: str = "ok",
    trace_id: bytes | None = None,
    span_id: bytes | None = None,
    error: str | None = None,
) -> tuple[str, Span]:
    """(service, span) of one step execution of the reference pipeline."""
    start = start_ns if start_ns is not None else time.time_ns()
    span = Span(
        trace_id=trace_id or os.urandom(16),
        span_id=span_id or os.urandom(8),
        name=STEPS[step_index],
        kind=Span.SPAN_KIND_CONSUMER,
        start_time_unix_nano=start,
        end_time_unix_nano=start + duration_ms * 1_000_000,
        attributes=[
            kv("hoptrace.correlation_id", cid),
            kv("hoptrace.pipeline", "payments"),
            kv("hoptrace.step", STEPS[step_index]),
            kv("hoptrace.step.outcome", outcome),
        ],
        status=Status(code=2 if outcome == "error" else 1, message=error or ""),
    )
    return SERVICES[step_index], span


def request(spans: list[tuple[str, Span]]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for service, span in spans:
        rs = req.resource_spans.add()
        rs.resource.attributes.append(kv("service.name", service))
        ss = rs.scope_spans.add()
        ss.scope.name = "test"
        ss.spans.append(span)
    return req

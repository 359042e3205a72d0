"""Builders for OTLP requests, a collector-on-free-ports fixture helper, and a store that stops
taking spans."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
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


@asynccontextmanager
async def spans_locked(pool: asyncpg.Pool) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A lock on ``spans`` that makes the collector's span writes wait (reads go on, and so does
    everything else), held until the yielded ``release()`` is awaited or the block ends. Take it
    after the collector started: its start needs the table too."""
    conn = await pool.acquire()
    tr = conn.transaction()
    await tr.start()
    held = True

    async def release() -> None:
        nonlocal held
        if held:
            held = False
            await tr.rollback()

    try:
        await conn.execute("LOCK TABLE spans IN SHARE MODE")
        yield release
    finally:
        await release()
        await pool.release(conn)

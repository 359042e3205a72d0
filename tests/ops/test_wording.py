"""What `hoptrace trace` says about a producer-only first step (payment-service's
``payment.confirmed``): it *emitted* a record; it consumed none. The spans are the real ones
hoptrace's instrumentation makes (``step_span`` + ``record_emit``), exported into memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.structs import RecordMetadata
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.collector.diagnosis import Evidence, SpanRecord, diagnose
from hoptrace.collector.render import render
from hoptrace.contract import load_spec
from hoptrace.instrumentation.producer import record_emit, step_span
from hoptrace.instrumentation.tracing import configure_tracing, shutdown_tracing

from ..support import REFERENCE_SPEC

SPEC = load_spec(REFERENCE_SPEC)
CID = "pay-wording-1"
FIRST = SPEC.steps[0]


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_tracing("payment-service", exporter=exporter, simple=True, instrument=False)
    yield exporter
    shutdown_tracing(timeout_s=2.0)


def _stored(span: ReadableSpan) -> SpanRecord:
    """The span as the store gives it back to the diagnosis."""
    ctx = span.get_span_context()
    start = datetime.fromtimestamp(span.start_time / 1e9, UTC)
    attrs = dict(span.attributes or {})
    return SpanRecord(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        name=span.name,
        service=FIRST.service,
        start_time=start,
        end_time=start + timedelta(milliseconds=3),
        kind=span.kind.value,
        status_code=1,
        step=attrs.get("hoptrace.step"),
        outcome=attrs.get("hoptrace.step.outcome"),
        attributes=attrs,
        correlation_id=CID,
    )


def test_a_producer_only_step_is_said_to_have_emitted_never_consumed(
    exported: InMemorySpanExporter,
) -> None:
    assert FIRST.emits and not FIRST.consumes  # the reference pipeline's producer-only step
    with step_span(SPEC, FIRST.id, CID) as span:
        record_emit(span, RecordMetadata(FIRST.emits, 2, None, 41, -1, None, 0))
    (made,) = exported.get_finished_spans()
    stored = _stored(made)
    ev = Evidence(correlation_id=CID, spans=(stored,), kafka={}, processed=(), effects={})
    d = diagnose(SPEC, ev, stored.start_time + timedelta(minutes=10))

    doc = json.loads(render(d, "json"))
    step = doc["steps"][0]
    assert step["id"] == FIRST.id
    assert step["consumed"] is None
    assert step["emitted"] == {"topic": FIRST.emits, "partition": 2, "offset": 41}
    assert f"emitted {FIRST.emits}[2]@41" in step["evidence"]
    assert not [line for line in step["evidence"] if "consumed" in line], step["evidence"]
    md = render(d, "markdown")
    first_row = next(ln for ln in md.splitlines() if f"`{FIRST.id}`" in ln and ln.startswith("|"))
    assert "consumed" not in first_row and "emitted" in first_row

"""The test's side of an interop run: the traced upstream producer, the database and Kafka
probes that wait for a service's effects, and the artifacts a run leaves for the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord, TopicPartition
from opentelemetry import baggage as otel_baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hoptrace.contract import conventions as conv
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.instrumentation.quiet import quiet

from ..support import wait_for
from .harness import ARTIFACTS, Service
from .spans import Span, SpanSink


@dataclass(frozen=True)
class Upstream:
    """The record the test produced, and the producer span its headers point at."""

    payment_id: str
    envelope: Envelope
    topic: str
    partition: int
    offset: int
    trace_id: str
    span_id: str

    def summary(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "event_id": self.envelope.event_id,
            "record": f"{self.topic}[{self.partition}]@{self.offset}",
            "producer_span": {"trace_id": self.trace_id, "span_id": self.span_id},
        }


@dataclass
class Run:
    """One service run: what the test produced, for the artifacts."""

    label: str
    context: dict[str, Any] = field(default_factory=dict)


async def produce_upstream(
    bootstrap: str, topic: str, event_type: str, payload: dict[str, Any], payment_id: str
) -> Upstream:
    """One envelope keyed by the payment id, sent inside a PRODUCER span of a test tracer with
    traceparent, baggage (hoptrace.correlation_id) and x-correlation-id headers."""
    envelope = Envelope.new(event_type, 1, payment_id, payload)
    tracer = TracerProvider().get_tracer("interop-test-upstream")
    span = tracer.start_span(f"send {topic}", kind=SpanKind.PRODUCER)
    ctx = otel_baggage.set_baggage(conv.BAGGAGE_KEY, payment_id, set_span_in_context(span))
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    W3CBaggagePropagator().inject(carrier, context=ctx)
    headers = [(k, v.encode()) for k, v in carrier.items()]
    headers.append((conv.CORRELATION_HEADER, payment_id.encode()))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        # another test may have instrumented aiokafka in this process: its send span would put a
        # second traceparent into the headers; quiet() keeps this test's own producer span
        with quiet():
            md = await producer.send_and_wait(
                topic, envelope.to_bytes(), key=payment_id.encode(), headers=headers
            )
    finally:
        await producer.stop()
        span.end()
    sc = span.get_span_context()
    return Upstream(
        payment_id=payment_id,
        envelope=envelope,
        topic=topic,
        partition=md.partition,
        offset=md.offset,
        trace_id=f"{sc.trace_id:032x}",
        span_id=f"{sc.span_id:016x}",
    )


async def fetch(db_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def committed(bootstrap: str, group: str, up: Upstream) -> int:
    """The group's committed offset of the upstream record's partition (-1 when none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    meta = offsets.get(TopicPartition(up.topic, up.partition))
    return meta.offset if meta is not None else -1


async def records_of(bootstrap: str, topic: str, timeout_s: float) -> list[ConsumerRecord]:
    """The records of ``topic`` that arrive within ``timeout_s`` (no group)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=10)
    finally:
        await consumer.stop()
    return [r for batch in batches.values() for r in batch]


async def until_spans(sink: SpanSink, check: Callable[[list[Span]], object], what: str) -> None:
    async def probe() -> object:
        return check(sink.spans())

    await wait_for(probe, timeout=30.0, what=what)


def one(spans: list[Span], what: str) -> Span:
    assert len(spans) == 1, f"expected one {what}, got {[(s.name, s.kind) for s in spans]}"
    return spans[0]


def save(sink: SpanSink, service: Service, run: Run) -> None:
    """The run's spans and log under tests/artifacts (also when the test failed)."""
    sink.write(ARTIFACTS / f"interop-{run.label}-spans.json", service=service.name, **run.context)
    service.save_log(ARTIFACTS / f"interop-{run.label}.log")


def failed_attempts(spans: list[Span], name: str, up: Upstream) -> list[Span]:
    return [
        s
        for s in spans
        if s.name == name
        and s.status == "ERROR"
        and str(s.attributes.get(conv.MSG_OFFSET)) == str(up.offset)
    ]


def one_event(span: Span) -> dict[str, Any]:
    assert [e["name"] for e in span.events] == [conv.EXCEPTION_EVENT], span.events
    return span.events[0]

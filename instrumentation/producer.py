"""Emitting envelopes with the correlation id in baggage, an explicit header and the payload; and
the step span of a producer-only first step (e.g. payment-service)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from hoptrace.contract import Outcome, PipelineSpec
from hoptrace.contract import conventions as c
from hoptrace.contract.conventions import (
    BAGGAGE_KEY,
    CORRELATION_HEADER,
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
)
from hoptrace.kafka import client_options

from ._accel import Speedup, enabled
from .envelope import (
    Envelope,
)
from .quiet import quiet
from .tracing import get_tracer

Headers = list[tuple[str, bytes]]


class _HeaderSetter:
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_setter = _HeaderSetter()


def _kafka_instrumented() -> bool:
    try:
        from opentelemetry.instrumentation.aiokafka import AIOKafkaInstrumentor
    except ImportError:  # pragma: no cover
        return False
    return bool(AIOKafkaInstrumentor().is_instrumented_by_opentelemetry)


def envelope_headers(envelope: Envelope) -> Headers:
    """The explicit headers every emitted record carries."""
    return [
        (CORRELATION_HEADER, envelope.correlation_id.encode()),
        (EVENT_ID_HEADER, envelope.event_id.encode()),
        (EVENT_TYPE_HEADER, envelope.type.encode()),
    ]


def record_emit(
    span: Span, md: RecordMetadata, envelope: Envelope | None = None, key: bytes | None = None
) -> None:
    """Put the produced record's topic/partition/offset on ``span``: always as
    ``hoptrace.emit.*``; as messaging.* (with its key) too when the span has no consume side."""
    if not span.is_recording():
        return
    attrs: dict[str, Any] = {
        c.ATTR_EMIT_TOPIC: md.topic,
        c.ATTR_EMIT_PARTITION: md.partition,
        c.ATTR_EMIT_OFFSET: md.offset,
    }
    if envelope is not None:
        attrs[c.ATTR_EMIT_EVENT_ID] = envelope.event_id
    if c.MSG_DESTINATION not in (getattr(span, "attributes", None) or {}):
        attrs[c.MSG_SYSTEM] = c.MESSAGING_SYSTEM_KAFKA
        attrs[c.MSG_DESTINATION] = md.topic
        attrs[c.MSG_PARTITION] = str(md.partition)
        attrs[c.MSG_OFFSET] = md.offset
        attrs[c.MSG_OPERATION_TYPE] = c.Operation.SEND
        if key is not None:
            attrs[c.MSG_MESSAGE_KEY] = key.decode("utf-8", "replace")
    span.set_attributes(attrs)


class HopProducer:
    """Emit Envelopes to Kafka with baggage + ``x-correlation-id`` + traceparent.

    ``aiokafka_opts`` go to ``AIOKafkaProducer`` (defaults: acks="all", idempotent, and the
    security options of ``HOPTRACE_KAFKA_*``: :func:`hoptrace.kafka.client_options`)."""

    def __init__(self, bootstrap: str, **aiokafka_opts: Any) -> None:
        opts: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 0}
        opts.update(client_options())
        opts.update(aiokafka_opts)
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **opts)
        self._started = False

    async def start(self) -> None:
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def __aenter__(self) -> HopProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Headers | None = None,
    ) -> RecordMetadata:
        """Send bytes as they are (dead-letter copies) with the current trace context; waits
        for the broker's ack."""
        out = list(headers or [])
        if not _kafka_instrumented():
            propagate.inject(out, setter=_setter)
        return await self._producer.send_and_wait(topic, value, key=key, headers=out)

    async def emit(
        self,
        topic: str,
        envelope: Envelope,
        key: bytes | None = None,
        *,
        send_span: bool = True,
    ) -> RecordMetadata:
        """Send ``envelope`` and wait for the ack; the current span gets the record's topic,
        partition and offset. The key defaults to the correlation id (one correlation, one
        partition, in order). ``send_span=False`` skips the aiokafka send span: the record's
        traceparent then names the current span (the hop runtime's process span)."""
        headers = envelope_headers(envelope)
        cid = envelope.correlation_id
        ctx = context.get_current()
        if cid and baggage.get_baggage(BAGGAGE_KEY, ctx) != cid:
            ctx = baggage.set_baggage(BAGGAGE_KEY, cid, ctx)
        if key is None and cid:
            key = cid.encode()
        value = envelope.to_bytes()
        if send_span and _kafka_instrumented():  # the instrumentation's send span
            md = await self._send_with_span(topic, value, key, headers, ctx)
        else:  # no send span: the current span (the process span) is the record's parent
            propagate.inject(headers, context=ctx, setter=_setter)
            md = await self._send_without_span(topic, value, key, headers)
        record_emit(trace.get_current_span(), md, envelope, key)
        return md

    async def _send_with_span(
        self, topic: str, value: bytes, key: bytes | None, headers: Headers, ctx: context.Context
    ) -> RecordMetadata:
        """Send through the aiokafka instrumentation's send span (child of ``ctx``): built in
        one step when the speed-up allows, else made by its wrapper."""
        if enabled(Speedup.AIOKAFKA):
            from ._accel.aiokafka import traced_send

            return await traced_send(self._producer, topic, value, key, headers, ctx)
        token = context.attach(ctx)
        try:
            fut = await self._producer.send(topic, value, key=key, headers=headers)
        finally:
            context.detach(token)
        return await fut

    async def _send_without_span(
        self, topic: str, value: bytes, key: bytes | None, headers: Headers
    ) -> RecordMetadata:
        """aiokafka's send without a send span: past the instrumentation's wrapper when the
        speed-up allows, else through it under ``quiet()`` (no span, nothing injected)."""
        if enabled(Speedup.AIOKAFKA):
            from ._accel.aiokafka import unwrapped_send

            plain = unwrapped_send()
            if plain is not None:
                return await (await plain(self._producer, topic, value, key, None, None, headers))
        with quiet():
            fut = await self._producer.send(topic, value, key=key, headers=headers)
        return await fut


@contextlib.contextmanager
def step_span(
    spec: PipelineSpec, step_id: str, correlation_id: str, **attrs: Any
) -> Iterator[Span]:
    """The step span of a producer-only step (e.g. payment-service): named after the step id,
    with hoptrace.* attributes and baggage attached inside; outcome ``ok`` on a clean exit,
    ``error`` (status ERROR, exception recorded) when the block raises. A block may set the
    outcome itself (``span.set_attribute("hoptrace.step.outcome", ...)``) before leaving."""
    step = spec.step(step_id)
    tracer = get_tracer()
    ctx = baggage.set_baggage(BAGGAGE_KEY, correlation_id)
    token = context.attach(ctx)
    try:
        with tracer.start_as_current_span(
            step.id,
            kind=SpanKind.PRODUCER if step.emits else SpanKind.INTERNAL,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute(c.ATTR_PIPELINE, spec.name)
            span.set_attribute(c.ATTR_STEP, step.id)
            span.set_attribute(c.ATTR_CORRELATION_ID, correlation_id)
            for k, v in attrs.items():
                span.set_attribute(k, v)
            try:
                yield span
            except BaseException as exc:
                span.set_attribute(c.ATTR_OUTCOME, Outcome.ERROR.value)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            else:
                existing = getattr(span, "attributes", None) or {}
                if c.ATTR_OUTCOME not in existing:
                    span.set_attribute(c.ATTR_OUTCOME, Outcome.OK.value)
    finally:
        context.detach(token)

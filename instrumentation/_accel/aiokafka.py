"""aiokafka shortcuts: the send span built in one step, and sends/fetches past the aiokafka
instrumentation's wrappers when no span of theirs is wanted.

* :func:`traced_send`: the span the instrumentation's send wrapper makes (``<topic> send``,
  PRODUCER, its scope, the same messaging attributes, traceparent + baggage injected into the
  headers), without its per-send partitioner run and attribute calls; the partition is set from
  the broker's ack (the wrapper computes it before the send: the same partition). A failed
  send leaves the span as the wrapper's (no exception on it: the wrapper ends its span before
  the send). Reaches into ``client._bootstrap_servers`` / ``client._client_id``.
* :func:`unwrapped_send` / :func:`unwrapped_getmany`: ``AIOKafkaProducer.send`` and
  ``AIOKafkaConsumer.getmany`` without the wrapper (wrapt's ``__wrapped__``), for the hop
  runtime's emits (the process span is the next hop's parent) and fetches (the process span
  carries what a receive span would).

The plain path (``hoptrace.instrumentation.producer`` and the hop runtime) calls the wrapped
methods: under ``quiet()`` where no span is wanted (``hoptrace.instrumentation.quiet`` makes
the instrumentation honour suppression), as they are for the send span.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.aiokafka import version as _instr_version
from opentelemetry.semconv.schemas import Schemas
from opentelemetry.trace import SpanKind

from hoptrace.contract import conventions as c

Headers = list[tuple[str, bytes]]

#: The instrumentation's tracer scope (its send spans carry it; so do the ones made here).
SCOPE_NAME = "opentelemetry.instrumentation.aiokafka"
SCHEMA_URL = Schemas.V1_27_0.value


class _Setter:
    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode()))


_setter = _Setter()
_clients: weakref.WeakKeyDictionary[AIOKafkaProducer, tuple[str, str]] = weakref.WeakKeyDictionary()
_tracer: tuple[trace.TracerProvider, trace.Tracer] | None = None


def _scope_tracer() -> trace.Tracer:
    """The instrumentation's tracer (same name, version and schema) on the current provider."""
    global _tracer
    provider = trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:
        tracer = provider.get_tracer(SCOPE_NAME, _instr_version.__version__, schema_url=SCHEMA_URL)
        _tracer = (provider, tracer)
    return _tracer[1]


def unwrapped_send() -> Any | None:
    """``AIOKafkaProducer.send`` past the instrumentation's wrapper (None: not instrumented)."""
    return getattr(AIOKafkaProducer.send, "__wrapped__", None)


def unwrapped_getmany(consumer: AIOKafkaConsumer) -> Any | None:
    """``consumer.getmany`` past the instrumentation's wrapper (None: not instrumented, or
    ``consumer`` is not an ``AIOKafkaConsumer`` whose ``getmany`` is the wrapped one: anything
    else is called as it is)."""
    plain = getattr(AIOKafkaConsumer.getmany, "__wrapped__", None)
    if plain is None or getattr(type(consumer), "getmany", None) is not AIOKafkaConsumer.getmany:
        return None

    def getmany(*args: Any, **kwargs: Any) -> Any:
        return plain(consumer, *args, **kwargs)

    return getmany


async def traced_send(
    producer: AIOKafkaProducer,
    topic: str,
    value: bytes,
    key: bytes | None,
    headers: Headers,
    ctx: context.Context,
) -> RecordMetadata:
    """Send with the instrumentation's send span (see module doc), ended at the broker's ack;
    waits for the ack. ``ctx`` is the span's parent context (its baggage is injected)."""
    plain = unwrapped_send()
    assert plain is not None, "traced_send needs the aiokafka instrumentation installed"
    client = producer.client
    known = _clients.get(producer)
    if known is None:
        known = _clients[producer] = (json.dumps(client._bootstrap_servers), client._client_id)
    attrs: dict[str, Any] = {
        c.MSG_SYSTEM: c.MESSAGING_SYSTEM_KAFKA,
        c.SERVER_ADDRESS: known[0],
        c.MSG_CLIENT_ID: known[1],
        c.MSG_DESTINATION: topic,
        c.MSG_OPERATION_NAME: c.Operation.SEND,
        c.MSG_OPERATION_TYPE: c.Operation.PUBLISH,
    }
    if key is not None:
        attrs[c.MSG_MESSAGE_KEY] = key.decode("utf-8", "replace")
    span = _scope_tracer().start_span(
        f"{topic} {c.Operation.SEND}", context=ctx, kind=SpanKind.PRODUCER, attributes=attrs
    )
    try:
        propagate.inject(headers, context=trace.set_span_in_context(span, ctx), setter=_setter)
        md = await (await plain(producer, topic, value, key, None, None, headers))
    except BaseException:
        span.end()  # as the wrapper's span: it ends before the send, so a failure is not on it
        raise
    span.set_attribute(c.MSG_PARTITION, str(md.partition))
    span.end()
    return md

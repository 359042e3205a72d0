"""Carrying out one planned action: the redrive's span (a new trace, "redrive <step>", linked to
the correlation's traces), the processed mark removed, the record published, the audit row.

The record keeps its correlation headers (``x-correlation-id``, ``x-event-id``,
``x-event-type``) and its value, so the worker's idempotency guard sees the original event id;
trace headers and dead-letter headers are dropped, and the redrive's context (its traceparent
and the correlation baggage) is injected, so the new attempt's spans are in the redrive's trace.
The audit row is written before the record is sent (its id goes into the record's
``x-hoptrace-redrive`` header) and finished after the broker's ack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
from opentelemetry import baggage, context, trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from hoptrace.contract import RedriveResult
from hoptrace.contract import conventions as c
from hoptrace.instrumentation.producer import HopProducer
from hoptrace.instrumentation.tracing import get_tracer

from . import audit
from .plan import Action, Kind, Mark
from .sources import quote

log = logging.getLogger("hoptrace.repair")

#: Span links to the correlation's traces, at most.
MAX_LINKS = 16


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one action did."""

    action: Action
    result: str
    audit_id: int | None = None
    sent: tuple[str, int, int] | None = None
    trace_id: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.result != RedriveResult.FAILED


def _link(trace_id: str) -> Link | None:
    try:
        tid = int(trace_id, 16)
    except ValueError:
        return None
    # the original trace's id; the span id is not known here (any non-zero value links it)
    ctx = SpanContext(tid, 1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return Link(ctx, {c.ATTR_REDRIVE_ORIGIN_TRACE: trace_id})


def headers_for(action: Action, audit_id: int) -> list[tuple[str, bytes]]:
    """The record's headers: its own minus trace and dead-letter headers, the correlation id
    (added when missing) and the redrive's id (the trace context is injected at send)."""
    assert action.record is not None
    out = [
        (k, v)
        for k, v in action.record.headers
        if k not in c.TRACE_HEADERS
        and not k.startswith(c.DLQ_HEADER_PREFIX)
        and k != c.REDRIVE_HEADER
    ]
    if not any(k == c.CORRELATION_HEADER for k, _ in out):
        out.append((c.CORRELATION_HEADER, action.correlation_id.encode()))
    out.append((c.REDRIVE_HEADER, str(audit_id).encode()))
    return out


async def remove_mark(conn: asyncpg.Connection, mark: Mark) -> int:
    """Delete the processed mark; how many rows went."""
    sql = f"DELETE FROM {quote(mark.table)} WHERE {mark.where_sql}"  # noqa: S608
    status = await conn.execute(sql, *mark.args)
    return int(status.split()[-1])


async def record_only(pool: asyncpg.Pool, action: Action, who: str) -> Applied:
    """An action that sends nothing: audited with its result (waiting, nothing, ...)."""
    result = {
        Kind.WAIT: RedriveResult.WAITING,
        Kind.NOTHING: RedriveResult.NOTHING,
        Kind.IN_FLIGHT: RedriveResult.IN_FLIGHT,
        Kind.REFUSE: RedriveResult.REFUSED,
    }[action.kind]
    row = await audit.begin(
        pool,
        cid=action.correlation_id,
        step=action.step,
        cause=action.cause,
        action=action.kind.value,
        result=result,
        who=who,
        detail=action.reason,
        origin_trace_id=action.origin_traces[0] if action.origin_traces else None,
    )
    return Applied(action, result, row, detail=action.reason)


async def send(pool: asyncpg.Pool, producer: HopProducer, action: Action, who: str) -> Applied:
    """Remove the mark (if any), publish the record under the redrive's span, audit it."""
    assert action.kind.sends and action.record is not None and action.topic is not None
    links = [lk for lk in map(_link, action.origin_traces[:MAX_LINKS]) if lk is not None]
    attrs = {
        c.ATTR_CORRELATION_ID: action.correlation_id,
        c.ATTR_REDRIVE_ACTION: action.kind.value,
    }
    if action.origin_traces:
        attrs[c.ATTR_REDRIVE_ORIGIN_TRACE] = action.origin_traces[0]
    ctx = baggage.set_baggage(c.BAGGAGE_KEY, action.correlation_id, context.Context())
    span = get_tracer().start_span(
        f"redrive {action.step}", context=ctx, kind=SpanKind.PRODUCER, attributes=attrs, links=links
    )
    trace_id = format(span.get_span_context().trace_id, "032x")
    row = await audit.begin(
        pool,
        cid=action.correlation_id,
        step=action.step,
        cause=action.cause,
        action=action.kind.value,
        result=RedriveResult.SENDING,
        who=who,
        source=action.record.where,
        detail=action.reason,
        trace_id=trace_id if span.get_span_context().is_valid else None,
        origin_trace_id=action.origin_traces[0] if action.origin_traces else None,
    )
    token = context.attach(trace.set_span_in_context(span, ctx))
    removed: str | None = None
    try:
        if action.remove_mark is not None:
            async with pool.acquire() as conn:
                gone = await remove_mark(conn, action.remove_mark)
            removed = f"{action.remove_mark} ({gone} row{'s' if gone != 1 else ''} removed)"
        key = action.record.key or action.correlation_id.encode()
        md = await producer.send_raw(
            action.topic, action.record.value, key=key, headers=headers_for(action, row)
        )
    except Exception as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        detail = f"{type(exc).__name__}: {exc}"
        await audit.finish(pool, row, RedriveResult.FAILED, detail=detail, removed_mark=removed)
        log.warning("redrive of %s at %s failed: %s", action.correlation_id, action.step, detail)
        return Applied(action, RedriveResult.FAILED, row, None, trace_id, detail)
    finally:
        context.detach(token)
        span.end()
    sent = (md.topic, md.partition, md.offset)
    await audit.finish(pool, row, RedriveResult.SENT, sent=sent, removed_mark=removed)
    return Applied(action, RedriveResult.SENT, row, sent, trace_id, removed)

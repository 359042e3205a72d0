"""What stored spans say about a step: which step a span ran, its outcome, the record it consumed
or emitted, its error text, and whether a downstream call under it failed.

Read by the diagnosis (every rule) and by the Kafka facts gathering (the record a step emitted is
the record the next step's group must consume). Pure functions over :class:`SpanRecord`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from hoptrace.contract import Cause, Outcome, Step
from hoptrace.contract.conventions import (
    ATTR_DOWNSTREAM,
    ATTR_OUTCOME,
    ATTR_STEP,
    DOWNSTREAM_KEYS,
    EMIT_OFFSET_KEYS,
    EMIT_PARTITION_KEYS,
    EMIT_TOPIC_KEYS,
    EXCEPTION_EVENT,
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
    HTTP_STATUS_KEYS,
    MSG_DESTINATION,
    MSG_OFFSET,
    MSG_PARTITION,
    PEER_KEYS,
    SERVER_ADDRESS,
    STATUS_ERROR,
    SpanKind,
)

from .records import RecordRef, SpanRecord

#: Where a failed downstream call's target is named, in order (``hoptrace.downstream``, then the
#: peer).
_PEER_SERVICE = PEER_KEYS[0]
_DOWNSTREAM_TARGET_KEYS = (ATTR_DOWNSTREAM, SERVER_ADDRESS, _PEER_SERVICE)
_OK_OUTCOMES = frozenset({Outcome.OK.value, Outcome.DUPLICATE.value})


def ts(value: datetime | None) -> str:
    """A time as evidence lines show it (ISO, milliseconds; ``?`` when unknown)."""
    return value.isoformat(timespec="milliseconds") if value else "?"


def as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def is_kind(span: SpanRecord, kind: SpanKind) -> bool:
    """The span's kind is ``kind`` (stored as the OTLP number, or as a name)."""
    if isinstance(span.kind, int):
        return span.kind == kind
    text = str(span.kind or "").lower()
    return kind.name.lower() in text or text == str(int(kind))


def span_step(span: SpanRecord, ids: set[str] | frozenset[str]) -> str | None:
    """The step of ``ids`` this span is the step span of, or None."""
    sid = span.step or span.attributes.get(ATTR_STEP)
    if sid in ids:
        return str(sid)
    if span.name in ids and span.attributes.get(ATTR_OUTCOME) is not None:
        return span.name
    return None


def outcome(span: SpanRecord) -> str:
    """The step outcome the span reports (``error``/``ok`` from its status when it names none)."""
    out = span.outcome or span.attributes.get(ATTR_OUTCOME)
    if out:
        return str(out)
    return Outcome.ERROR.value if span.status_code == STATUS_ERROR else Outcome.OK.value


def is_ok(span: SpanRecord) -> bool:
    return outcome(span) in _OK_OUTCOMES and span.status_code != STATUS_ERROR


def reports_ok(span: SpanRecord) -> bool:
    """The span itself names an ``ok``/``duplicate`` outcome (status not considered)."""
    return (span.outcome or span.attributes.get(ATTR_OUTCOME)) in _OK_OUTCOMES


def emitted_record(
    step: Step, runs: Sequence[SpanRecord], all_spans: Sequence[SpanRecord]
) -> RecordRef | None:
    """The record a step produced: emit attributes on its span, else a producer span below it."""
    if not step.emits:
        return None
    for span in runs:
        topic = span.attr(*EMIT_TOPIC_KEYS)
        if topic:
            return RecordRef(
                str(topic),
                as_int(span.attr(*EMIT_PARTITION_KEYS)),
                as_int(span.attr(*EMIT_OFFSET_KEYS)),
            )
    run_ids = {s.span_id for s in runs}
    traces = {s.trace_id for s in runs}
    for span in all_spans:
        if span.trace_id not in traces or span.attributes.get(MSG_DESTINATION) != step.emits:
            continue
        if is_kind(span, SpanKind.PRODUCER) or span.parent_span_id in run_ids:
            if span.span_id in run_ids:
                continue
            return RecordRef(
                step.emits, as_int(span.attr(MSG_PARTITION)), as_int(span.attr(MSG_OFFSET))
            )
    return None


def consumed_record(span: SpanRecord) -> RecordRef | None:
    """The record a consuming step span handled (its messaging attributes)."""
    topic = span.attributes.get(MSG_DESTINATION)
    if not topic:
        return None
    return RecordRef(str(topic), as_int(span.attr(MSG_PARTITION)), as_int(span.attr(MSG_OFFSET)))


def descendants(root: SpanRecord, spans: Sequence[SpanRecord]) -> list[SpanRecord]:
    children: dict[str, list[SpanRecord]] = {}
    for s in spans:
        if s.trace_id == root.trace_id and s.parent_span_id:
            children.setdefault(s.parent_span_id, []).append(s)
    out: list[SpanRecord] = []
    todo = [root.span_id]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.span_id)
    return out


def exception_text(span: SpanRecord) -> str | None:
    for ev in span.events or ():
        if ev.get("name") == EXCEPTION_EVENT:
            attrs = ev.get("attributes") or {}
            etype = attrs.get(EXCEPTION_TYPE)
            msg = attrs.get(EXCEPTION_MESSAGE)
            if etype or msg:
                return f"{etype or 'Exception'}: {msg or ''}".strip()
    return None


def error_text(span: SpanRecord) -> str:
    return span.status_message or exception_text(span) or "error (no message)"


def downstream_failure(step: Step, span: SpanRecord, spans: Sequence[SpanRecord]) -> str | None:
    """A line naming the failed downstream call under an error step span, or None: the span says
    so itself, a client span below it failed, or its error names the service the step calls
    (``step.calls``)."""
    kind = span.attr(*DOWNSTREAM_KEYS)
    if kind and "downstream" in str(kind).lower():
        target = span.attr(*_DOWNSTREAM_TARGET_KEYS) or "downstream"
        return f"{target}: {error_text(span)}"
    for child in descendants(span, spans):
        status = as_int(child.attr(*HTTP_STATUS_KEYS))
        is_client = is_kind(child, SpanKind.CLIENT) or status is not None
        if not is_client:
            continue
        if (status is not None and status >= 500) or child.status_code == STATUS_ERROR:
            target = child.attr(*PEER_KEYS) or child.service
            what = f"HTTP {status}" if status is not None else error_text(child)
            return f"{child.name} -> {target}: {what}"
    text = (error_text(span) + " " + (exception_text(span) or "")).lower()
    if "downstream" in text or (step.calls and step.calls.lower() in text):
        return error_text(span)
    return None


def topic_error(span: SpanRecord) -> bool:
    """The span's error says a topic does not exist."""
    text = (error_text(span) + " " + (exception_text(span) or "")).lower()
    return "unknowntopic" in text or "unknown topic" in text or Cause.TOPIC_MISSING in text

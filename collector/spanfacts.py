"""What stored spans say about a step: which step a span is a run of, the run's outcome, the
record it consumed or emitted, its error text, and whether a downstream call under it failed.

Which spans are runs of which step is the contract's rule (``StepMatcher.step_of``): hoptrace's
own step spans, else the consumer/process span of a step's service on its topic (or the producer
span of a producer-only first step), in any SDK's spelling. A run of a span hoptrace did not make
is *normalised* here (its ``step`` and ``outcome`` filled in, the outcome from ``run_outcome``: it
failed when it or a span below it in the same run has status ERROR), so the rules read every run
the same way.

Read by the diagnosis (every rule), by the Kafka facts gathering (the record a step emitted is
the record the next step's group must consume) and by the evidence's second pass. Pure functions
over :class:`SpanRecord`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from hoptrace.contract import Cause, Outcome, PipelineSpec, Step
from hoptrace.contract.conventions import (
    ATTR_DOWNSTREAM,
    ATTR_OUTCOME,
    ATTR_STEP,
    DB_STATEMENT_KEYS,
    DB_TABLE_KEYS,
    DESTINATION_KEYS,
    DISTRO_NAME,
    DOWNSTREAM_KEYS,
    EMIT_OFFSET_KEYS,
    EMIT_PARTITION_KEYS,
    EMIT_TOPIC_KEYS,
    EXCEPTION_EVENT,
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
    GROUP_KEYS,
    HTTP_STATUS_KEYS,
    OFFSET_KEYS,
    PARTITION_KEYS,
    PEER_KEYS,
    RESOURCE_DISTRO_NAME,
    SERVER_ADDRESS,
    STATUS_ERROR,
    SpanKind,
)
from hoptrace.contract.matching import (
    Messaging,
    StepMatcher,
    first_attr,
    is_consume,
    is_produce,
    run_outcome,
)

from .records import RecordRef, SpanRecord

#: Where a failed downstream call's target is named, in order (``hoptrace.downstream``, then the
#: peer).
_PEER_SERVICE = PEER_KEYS[0]
_DOWNSTREAM_TARGET_KEYS = (ATTR_DOWNSTREAM, SERVER_ADDRESS, _PEER_SERVICE)
_OK_OUTCOMES = frozenset({Outcome.OK.value, Outcome.DUPLICATE.value})
#: The resource of a service that reports its steps itself (hoptrace's instrumentation).
_REPORTS_ITSELF: Mapping[str, Any] = {RESOURCE_DISTRO_NAME: DISTRO_NAME}
_KINDS = {k.name.lower(): int(k) for k in SpanKind}


def ts(value: datetime | None) -> str:
    """A time as evidence lines show it (ISO, milliseconds; ``?`` when unknown)."""
    return value.isoformat(timespec="milliseconds") if value else "?"


def as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def kind_of(span: SpanRecord) -> int:
    """The span's kind as the OTLP number (it is stored as the number, or as a name)."""
    if isinstance(span.kind, int):
        return span.kind
    text = str(span.kind or "").lower()
    if text.isdigit():
        return int(text)
    return next((v for name, v in _KINDS.items() if v and name in text), 0)


def is_kind(span: SpanRecord, kind: SpanKind) -> bool:
    """The span's kind is ``kind`` (stored as the OTLP number, or as a name)."""
    return kind_of(span) == kind


# ------------------------------------------------------------------------------ step runs


_MATCHERS: dict[int, tuple[PipelineSpec, StepMatcher]] = {}


def matcher_for(spec: PipelineSpec) -> StepMatcher:
    """The spec's step matcher, built once per spec object (looked up by identity: hashing a
    spec hashes every step, on every lookup)."""
    held = _MATCHERS.get(id(spec))
    if held is None or held[0] is not spec:
        if len(_MATCHERS) >= 16:
            _MATCHERS.clear()
        held = _MATCHERS[id(spec)] = (spec, StepMatcher(spec))
    return held[1]


def _reports_step(span: SpanRecord) -> bool:
    return span.step is not None or span.attributes.get(ATTR_STEP) is not None


def _children(spans: Sequence[SpanRecord]) -> dict[tuple[str, str], list[SpanRecord]]:
    out: dict[tuple[str, str], list[SpanRecord]] = {}
    for s in spans:
        if s.parent_span_id:
            out.setdefault((s.trace_id, s.parent_span_id), []).append(s)
    return out


def _starts_run(span: SpanRecord) -> bool:
    """The span begins a run of its own: a step span, or a consumer's per-record span."""
    if _reports_step(span):
        return True
    if first_attr(span.attributes, DESTINATION_KEYS) is None:
        return False
    return is_consume(kind_of(span), Messaging.of(span.attributes).operation)


def within(
    root: SpanRecord,
    spans: Sequence[SpanRecord],
    children: Mapping[tuple[str, str], list[SpanRecord]] | None = None,
) -> list[SpanRecord]:
    """The spans below ``root`` in its run: its service's spans under it, down to (not into) the
    next run (a step span, another consumer's span, another service's span)."""
    kids = children if children is not None else _children(spans)
    out: list[SpanRecord] = []
    todo = [root]
    while todo:
        node = todo.pop()
        for child in kids.get((node.trace_id, node.span_id), ()):
            if child.service != root.service or _starts_run(child):
                continue
            out.append(child)
            todo.append(child)
    return out


def step_runs(spec: PipelineSpec, spans: Sequence[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Each spec step's runs among ``spans`` (every step a key, runs in the order given). A span
    is a run by ``StepMatcher.step_of``; a service that reports hoptrace step spans in this
    evidence counts only through them (as its resource would say). A run hoptrace did not make
    comes back normalised: ``step``, ``outcome`` (``run_outcome``) and ``matched`` set."""
    matcher = matcher_for(spec)
    own_services = {s.service for s in spans if _reports_step(s)}
    out: dict[str, list[SpanRecord]] = {s.id: [] for s in spec.steps}
    children: dict[tuple[str, str], list[SpanRecord]] | None = None
    for span in spans:
        attrs = span.attributes
        marked = span.step if span.step is not None else attrs.get(ATTR_STEP)
        reported = span.outcome if span.outcome is not None else attrs.get(ATTR_OUTCOME)
        reports_itself = span.service in own_services
        if marked is None and reported is None and reports_itself:
            continue  # what step_of says of such a span: not a run (the common case, made cheap)
        # an early spelling: named after its step, with an outcome and no step attribute
        step = marked if marked is not None or reported is None else span.name
        resource = _REPORTS_ITSELF if reports_itself else span.resource
        sid = matcher.step_of(
            span.service, kind_of(span), span.name, attrs, resource, step, reported
        )
        if sid is None:
            continue
        if marked is None and reported is None:  # not hoptrace's: its outcome from its run
            if children is None:
                children = _children(spans)
            failed = any(s.status_code == STATUS_ERROR for s in within(span, spans, children))
            span = replace(
                span,
                step=sid,
                outcome=run_outcome(None, span.status_code, failed),
                matched=True,
            )
        out[sid].append(span)
    return out


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


def _record(topic: str, m: Messaging) -> RecordRef:
    return RecordRef(topic, m.partition, m.offset)


def emitted_record(
    step: Step, runs: Sequence[SpanRecord], all_spans: Sequence[SpanRecord]
) -> RecordRef | None:
    """The record a step produced: emit attributes on its span; a matched producer-only run is
    the producer span itself; else a producer span below a run (in its trace), any spelling."""
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
    for span in runs:
        if not span.matched:
            continue
        m = Messaging.of(span.attributes)
        if m.destination == step.emits and is_produce(kind_of(span), m.operation):
            return _record(step.emits, m)
    run_ids = {(s.trace_id, s.span_id) for s in runs}
    if not run_ids:
        return None
    traces = {s.trace_id for s in runs}
    below: set[tuple[str, str]] | None = None
    for span in all_spans:
        key = (span.trace_id, span.span_id)
        if span.trace_id not in traces or key in run_ids:
            continue
        if first_attr(span.attributes, DESTINATION_KEYS) != step.emits:
            continue
        m = Messaging.of(span.attributes)
        if is_kind(span, SpanKind.PRODUCER) or (span.trace_id, span.parent_span_id) in run_ids:
            return _record(step.emits, m)
        if is_produce(kind_of(span), m.operation):
            if below is None:
                kids = _children(all_spans)
                below = {(s.trace_id, s.span_id) for r in runs for s in within(r, all_spans, kids)}
            if key in below:
                return _record(step.emits, m)
    return None


def consumed_record(span: SpanRecord) -> RecordRef | None:
    """The record a consuming step span handled (its messaging attributes, any spelling). A
    producer-only step's run consumed nothing: its messaging attributes name the record it
    sent (hoptrace's step span of a first step, a foreign producer span)."""
    attrs = span.attributes
    if span.matched:  # a run hoptrace did not make: whatever its SDK's spelling
        m = Messaging.of(attrs)
        if not m.destination or is_produce(kind_of(span), m.operation):
            return None  # (a producer-only step's run consumed nothing)
        return _record(m.destination, m)
    topic = first_attr(attrs, DESTINATION_KEYS)
    if not isinstance(topic, str) or not topic:
        return None
    if is_produce(kind_of(span), Messaging.of(attrs).operation):
        return None  # the step span of a producer-only step: what it names it emitted
    return RecordRef(
        topic, as_int(first_attr(attrs, PARTITION_KEYS)), as_int(first_attr(attrs, OFFSET_KEYS))
    )


def consumer_group(span: SpanRecord) -> str | None:
    """The consumer group a run names (any spelling; None when it names none)."""
    group = first_attr(span.attributes, GROUP_KEYS)
    return group if isinstance(group, str) else None


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


def run_error_text(run: SpanRecord, spans: Sequence[SpanRecord]) -> str:
    """Why a run failed: its own error, else the first failed span in it (e.g. the database
    write under a consumer span that an agent left UNSET)."""
    own = run.status_message or exception_text(run)
    if own:
        return own
    for child in within(run, spans):
        if child.status_code == STATUS_ERROR:
            return f"{child.name}: {error_text(child)}"
    return error_text(run)


def _is_database(span: SpanRecord) -> bool:
    return span.attr(*DB_STATEMENT_KEYS, *DB_TABLE_KEYS) is not None


def downstream_failure(step: Step, span: SpanRecord, spans: Sequence[SpanRecord]) -> str | None:
    """A line naming the failed downstream call under an error step span, or None: the span says
    so itself, a client span in its run failed (the worker's own database is not downstream), or
    its error names the service the step calls (``step.calls``)."""
    kind = span.attr(*DOWNSTREAM_KEYS)
    if kind and "downstream" in str(kind).lower():
        target = span.attr(*_DOWNSTREAM_TARGET_KEYS) or "downstream"
        return f"{target}: {error_text(span)}"
    for child in within(span, spans):
        status = as_int(child.attr(*HTTP_STATUS_KEYS))
        is_client = is_kind(child, SpanKind.CLIENT) or status is not None
        if not is_client or (status is None and _is_database(child)):
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


def steps_of(
    runs: Mapping[str, Collection[SpanRecord]],
) -> dict[tuple[str, str], str]:
    """(trace id, span id) -> step id of every run (what a timeline lanes by)."""
    return {(s.trace_id, s.span_id): sid for sid, rs in runs.items() for s in rs}

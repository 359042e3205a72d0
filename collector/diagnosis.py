"""Diagnosis: a pure function from gathered evidence to "where did this correlation stop, and why".

``diagnose(spec, evidence, now) -> Diagnosis`` reads no server and no clock: the evidence is
gathered elsewhere (``evidence.py``) and passed in, so every cause code is unit-testable.

Rules, in order, for the first step that is not ``done`` (``stopped_at``):

* the step failed (error span or DLQ record): ``topic_missing`` when the topic it emits to is gone,
  ``downstream_error`` when a downstream call failed, else ``processing_error``;
* the step reported ``ok`` and marked the event processed, but its table has no row:
  ``marked_without_effect``;
* no span for the step: ``topic_missing`` (its topic does not exist), ``consumed_without_trace``
  (its effect row / processed mark exists, or its group committed past the record, and the step is
  overdue), ``not_emitted`` (the previous step finished without producing a record),
  ``no_consumer`` (its group has no members), ``consumer_lag`` (members, record not consumed,
  overdue), else ``in_progress``;
* when the source that would decide is unreadable: ``missing_evidence`` with the reason, never a
  guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hoptrace.contract import PipelineSpec, Step

#: Cause codes of DESIGN.md, plus ``missing_evidence`` when the deciding source could not be read.
CAUSES = (
    "completed",
    "in_progress",
    "topic_missing",
    "no_consumer",
    "consumer_lag",
    "processing_error",
    "downstream_error",
    "marked_without_effect",
    "not_emitted",
    "consumed_without_trace",
    "missing_evidence",
)
STATUSES = ("done", "failed", "pending", "stalled", "not_reached")
STATES = ("completed", "in_progress", "stalled", "failed")

STATUS_ERROR = 2

# Span attribute names (DESIGN.md's span conventions, plus the emit attributes of the hop runtime).
A_STEP = "hoptrace.step"
A_OUTCOME = "hoptrace.step.outcome"
A_TOPIC = "messaging.destination.name"
A_PARTITION = "messaging.destination.partition.id"
A_OFFSET = "messaging.kafka.offset"
A_GROUP = "messaging.consumer.group.name"
EMIT_TOPIC_KEYS = ("hoptrace.emit.topic", "hoptrace.emitted.topic")
EMIT_PARTITION_KEYS = ("hoptrace.emit.partition", "hoptrace.emitted.partition")
EMIT_OFFSET_KEYS = ("hoptrace.emit.offset", "hoptrace.emitted.offset")
DOWNSTREAM_KEYS = ("hoptrace.error.kind", "hoptrace.error.type", "error.type")
HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")


# ----------------------------------------------------------------------------------- evidence


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One stored span, as plain data."""

    trace_id: str
    span_id: str
    name: str
    service: str
    start_time: datetime
    end_time: datetime | None = None
    parent_span_id: str | None = None
    kind: str | int | None = None
    status_code: int = 0
    status_message: str | None = None
    step: str | None = None
    outcome: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[Mapping[str, Any]] = ()

    def attr(self, *keys: str) -> Any:
        for key in keys:
            value = self.attributes.get(key)
            if value is not None and value != "":
                return value
        return None


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A Kafka record: topic, partition, offset."""

    topic: str
    partition: int | None
    offset: int | None

    def __str__(self) -> str:
        part = "?" if self.partition is None else self.partition
        off = "?" if self.offset is None else self.offset
        return f"{self.topic}[{part}]@{off}"


@dataclass(frozen=True, slots=True)
class DlqRecord:
    topic: str
    partition: int
    offset: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaFacts:
    """What Kafka says about one step's consumed topic and group (``None`` = not known)."""

    topic: str | None
    group: str | None = None
    topic_exists: bool | None = None
    group_exists: bool | None = None
    group_state: str | None = None
    group_members: int | None = None
    #: the record this correlation produced into ``topic`` (from the previous step's emit span)
    record: RecordRef | None = None
    committed_offset: int | None = None
    end_offset: int | None = None
    #: other groups with committed offsets on ``topic`` (a worker running under a wrong group)
    other_groups: tuple[str, ...] | None = None
    dlq: DlqRecord | None = None
    dlq_checked: bool = False

    @property
    def lag(self) -> int | None:
        if self.end_offset is None:
            return None
        return self.end_offset - (self.committed_offset or 0)

    @property
    def record_consumed(self) -> bool | None:
        """Has the group committed past this correlation's record?"""
        if self.record is None or self.record.offset is None:
            return None
        if self.committed_offset is None:
            return False if self.group_exists is not None else None
        return self.committed_offset > self.record.offset


@dataclass(frozen=True, slots=True)
class ProcessedEvent:
    event_id: str
    event_type: str | None
    source: str | None
    processed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything gathered for one correlation. Sources that could not be read are in ``missing``
    (source -> reason), e.g. ``{"kafka": "timed out after 2.0s"}``."""

    correlation_id: str
    spans: tuple[SpanRecord, ...] = ()
    kafka: Mapping[str, KafkaFacts] = field(default_factory=dict)  # by step id
    processed: tuple[ProcessedEvent, ...] | None = None  # None: not read
    effects: Mapping[str, bool | None] = field(default_factory=dict)  # step id -> row exists
    missing: Mapping[str, str] = field(default_factory=dict)
    queries: tuple[str, ...] = ()
    gathered_in_ms: float | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)  # per source


# ----------------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class StepResult:
    id: str
    service: str
    status: str
    started_at: datetime | None = None
    ended_at: datetime | None = None
    runs: int = 0
    outcomes: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    trace_ids: tuple[str, ...] = ()
    consumed: RecordRef | None = None
    emitted: RecordRef | None = None


@dataclass(frozen=True, slots=True)
class Diagnosis:
    correlation_id: str
    pipeline: str
    found: bool
    state: str
    stopped_at: str | None
    cause: str
    summary: str
    evidence: tuple[str, ...]
    next_action: str
    steps: tuple[StepResult, ...]
    trace_ids: tuple[str, ...]
    missing: Mapping[str, str]
    checked_at: datetime
    queries: tuple[str, ...] = ()
    #: things worth a look that did not stop the correlation (e.g. consumed under another group)
    warnings: tuple[str, ...] = ()
    #: the evidence this diagnosis was computed from (Kafka facts, processed_events, effect rows)
    facts: Evidence | None = field(default=None, compare=False, repr=False)

    def step(self, step_id: str) -> StepResult:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


# ----------------------------------------------------------------------------------- helpers


def _ts(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value else "?"


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def event_type_for(topic: str | None) -> str | None:
    """``purchase-created`` -> ``PURCHASE_CREATED`` (the reference pipeline's event names)."""
    if not topic:
        return None
    return topic.split(".")[0].replace("-", "_").upper()


def _span_step(span: SpanRecord, ids: set[str]) -> str | None:
    sid = span.step or span.attributes.get(A_STEP)
    if sid in ids:
        return str(sid)
    if span.name in ids and span.attributes.get(A_OUTCOME) is not None:
        return span.name
    return None


def _outcome(span: SpanRecord) -> str:
    out = span.outcome or span.attributes.get(A_OUTCOME)
    if out:
        return str(out)
    return "error" if span.status_code == STATUS_ERROR else "ok"


def _is_ok(span: SpanRecord) -> bool:
    return _outcome(span) in ("ok", "duplicate") and span.status_code != STATUS_ERROR


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
                _int(span.attr(*EMIT_PARTITION_KEYS)),
                _int(span.attr(*EMIT_OFFSET_KEYS)),
            )
    run_ids = {s.span_id for s in runs}
    traces = {s.trace_id for s in runs}
    for span in all_spans:
        if span.trace_id not in traces or span.attributes.get(A_TOPIC) != step.emits:
            continue
        kind = str(span.kind or "").lower()
        if "producer" in kind or kind == "4" or span.parent_span_id in run_ids:
            if span.span_id in run_ids:
                continue
            return RecordRef(step.emits, _int(span.attr(A_PARTITION)), _int(span.attr(A_OFFSET)))
    return None


def _consumed(span: SpanRecord) -> RecordRef | None:
    topic = span.attributes.get(A_TOPIC)
    if not topic:
        return None
    return RecordRef(str(topic), _int(span.attr(A_PARTITION)), _int(span.attr(A_OFFSET)))


def _descendants(root: SpanRecord, spans: Sequence[SpanRecord]) -> list[SpanRecord]:
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


def _exception_text(span: SpanRecord) -> str | None:
    for ev in span.events or ():
        if ev.get("name") == "exception":
            attrs = ev.get("attributes") or {}
            etype = attrs.get("exception.type")
            msg = attrs.get("exception.message")
            if etype or msg:
                return f"{etype or 'Exception'}: {msg or ''}".strip()
    return None


def _error_text(span: SpanRecord) -> str:
    return span.status_message or _exception_text(span) or "error (no message)"


def _downstream_failure(span: SpanRecord, spans: Sequence[SpanRecord]) -> str | None:
    """A line naming the failed downstream call under an error step span, or None."""
    kind = span.attr(*DOWNSTREAM_KEYS)
    if kind and "downstream" in str(kind).lower():
        target = span.attr("hoptrace.downstream", "server.address", "peer.service") or "downstream"
        return f"{target}: {_error_text(span)}"
    for child in _descendants(span, spans):
        status = _int(child.attr(*HTTP_STATUS_KEYS))
        ckind = str(child.kind or "").lower()
        is_client = "client" in ckind or ckind == "3" or status is not None
        if not is_client:
            continue
        if (status is not None and status >= 500) or child.status_code == STATUS_ERROR:
            target = (
                child.attr("peer.service", "server.address", "url.full", "http.url")
                or child.service
            )
            what = f"HTTP {status}" if status is not None else _error_text(child)
            return f"{child.name} -> {target}: {what}"
    text = (_error_text(span) + " " + (_exception_text(span) or "")).lower()
    if "downstream" in text or "admin-service" in text:
        return _error_text(span)
    return None


def _topic_error(span: SpanRecord) -> bool:
    text = (_error_text(span) + " " + (_exception_text(span) or "")).lower()
    return "unknowntopic" in text or "unknown topic" in text or "topic_missing" in text


def _processed_for(
    step: Step, processed: Sequence[ProcessedEvent], known_sources: set[str]
) -> list[ProcessedEvent]:
    """The processed marks of a step: by its service/group as source, else by the event type of
    the topic it consumes (when the source names no step of the pipeline)."""
    names = {step.service, step.group, step.id} - {None}
    etype = event_type_for(step.consumes)
    return [
        p
        for p in processed
        if p.source in names
        or (etype and p.event_type == etype and (p.source is None or p.source not in known_sources))
    ]


def _fmt_age(delta: timedelta) -> str:
    secs = delta.total_seconds()
    if secs < 120:
        return f"{secs:.1f}s"
    if secs < 7200:
        return f"{secs / 60:.1f}m"
    return f"{secs / 3600:.1f}h"


# ----------------------------------------------------------------------------------- diagnose


@dataclass
class _StepView:
    step: Step
    runs: list[SpanRecord]
    ok: list[SpanRecord]
    errors: list[SpanRecord]
    processed: list[ProcessedEvent]
    effect: bool | None
    emitted: RecordRef | None
    status: str = "not_reached"
    lines: list[str] = field(default_factory=list)
    marked_without_effect: bool = False

    @property
    def started_at(self) -> datetime | None:
        return min((s.start_time for s in self.runs), default=None)

    @property
    def ended_at(self) -> datetime | None:
        ends = [s.end_time for s in (self.ok or self.runs) if s.end_time]
        return max(ends, default=None)


def diagnose(spec: PipelineSpec, evidence: Evidence, now: datetime) -> Diagnosis:
    """Where the correlation stopped and why, from evidence alone."""
    ids = {s.id for s in spec.steps}
    sources = {n for s in spec.steps for n in (s.service, s.group, s.id) if n}
    spans = sorted(evidence.spans, key=lambda s: s.start_time)
    processed = list(evidence.processed or ())
    by_step: dict[str, list[SpanRecord]] = {sid: [] for sid in ids}
    for span in spans:
        sid = _span_step(span, ids)
        if sid:
            by_step[sid].append(span)

    views: list[_StepView] = []
    for step in spec.steps:
        runs = by_step[step.id]
        ok = [s for s in runs if _is_ok(s)]
        errors = [s for s in runs if not _is_ok(s)]
        view = _StepView(
            step=step,
            runs=runs,
            ok=ok,
            errors=errors,
            processed=_processed_for(step, processed, sources) if step.consumes else [],
            effect=evidence.effects.get(step.id) if step.table else None,
            emitted=emitted_record(step, ok or runs, spans),
        )
        _describe_runs(view)
        if ok:
            view.status = "done"
            if step.table and view.effect is False:
                view.status = "failed"
                view.marked_without_effect = True
        elif errors:
            view.status = "failed"
        views.append(view)

    found = bool(spans) or bool(processed) or any(v is True for v in evidence.effects.values())
    trace_ids = tuple(dict.fromkeys(s.trace_id for s in spans))
    stop = next((v for v in views if v.status != "done"), None)

    if "spans" in evidence.missing and not spans:
        cause, lines, action = (
            "missing_evidence",
            [f"spans could not be read: {evidence.missing['spans']}"],
            "retry when the span store answers",
        )
        state = "in_progress"
        stop_id = stop.step.id if stop else None
    elif stop is None:
        cause, lines, action, state, stop_id = (
            "completed",
            _completed(views),
            "nothing to do",
            "completed",
            None,
        )
    else:
        idx = views.index(stop)
        prev = views[idx - 1] if idx > 0 else None
        cause, lines, action = _decide(spec, stop, prev, views, evidence, now)
        stop_id = stop.step.id
        if stop.status not in ("done", "failed"):
            if cause in ("processing_error", "downstream_error"):
                stop.status = "failed"
            else:
                stop.status = "stalled" if _overdue(stop, prev, spans, now) else "pending"
        state = {"failed": "failed", "stalled": "stalled"}.get(stop.status, "in_progress")
        for later in views[idx + 1 :]:
            if later.status != "done" and later.status != "failed":
                later.status = "not_reached"

    if not found and cause != "missing_evidence":
        lines = ["no span, processed_events row or effect row carries this correlation id"]
        if evidence.missing:
            lines += [f"{k} could not be read: {v}" for k, v in evidence.missing.items()]

    summary = _summary(cause, stop_id, lines)
    warnings = _warnings(views)
    steps = tuple(
        StepResult(
            id=v.step.id,
            service=v.step.service,
            status=v.status,
            started_at=v.started_at,
            ended_at=v.ended_at,
            runs=len(v.runs),
            outcomes=tuple(_outcome(s) for s in v.runs),
            evidence=tuple(v.lines),
            trace_ids=tuple(dict.fromkeys(s.trace_id for s in v.runs)),
            consumed=next((c for c in map(_consumed, v.ok or v.runs) if c), None),
            emitted=v.emitted,
        )
        for v in views
    )
    return Diagnosis(
        correlation_id=evidence.correlation_id,
        pipeline=spec.name,
        found=found,
        state=state if found else "in_progress",
        stopped_at=stop_id,
        cause=cause,
        summary=summary,
        evidence=tuple(lines),
        next_action=action,
        steps=steps,
        trace_ids=trace_ids,
        missing=dict(evidence.missing),
        checked_at=now,
        queries=evidence.queries,
        warnings=warnings,
        facts=evidence,
    )


def _warnings(views: list[_StepView]) -> tuple[str, ...]:
    out: list[str] = []
    for v in views:
        groups = {str(s.attributes.get(A_GROUP)) for s in v.runs if s.attributes.get(A_GROUP)}
        for g in sorted(groups - {v.step.group}):
            if v.step.group:
                out.append(
                    f"{v.step.id} was consumed as group {g}, the spec's group is {v.step.group} "
                    "(a worker on a wrong group: check `hoptrace check deploy`)"
                )
        if len(v.ok) > 1:
            out.append(
                f"{v.step.id} ran {len(v.ok)} times ({', '.join(_outcome(s) for s in v.ok)})"
            )
    return tuple(out)


def _completed(views: list[_StepView]) -> list[str]:
    lines = [f"all {len(views)} steps done"]
    for v in views:
        if len(v.ok) > 1:
            lines.append(
                f"{v.step.id} ran {len(v.ok)} times ({', '.join(_outcome(s) for s in v.ok)})"
            )
    return lines


def _describe_runs(view: _StepView) -> None:
    step = view.step
    for span in view.runs:
        line = f"span {span.name} {_outcome(span)} at {_ts(span.start_time)} (trace {span.trace_id[:16]})"
        consumed = _consumed(span)
        if consumed:
            line += f", consumed {consumed}"
            group = span.attributes.get(A_GROUP)
            if group:
                line += f" as group {group}"
                if step.group and group != step.group:
                    line += f" (spec expects {step.group})"
        if span.status_code == STATUS_ERROR or _outcome(span) == "error":
            line += f": {_error_text(span)}"
        view.lines.append(line)
    if view.emitted:
        view.lines.append(f"emitted {view.emitted}")
    for p in view.processed:
        view.lines.append(
            f"processed_events: {p.event_type or '?'} {p.event_id} by {p.source or '?'} at {_ts(p.processed_at)}"
        )
    if step.table and view.effect is not None:
        view.lines.append(f"{step.table}: {'row present' if view.effect else 'no row'}")


def _overdue(
    stop: _StepView, prev: _StepView | None, spans: Sequence[SpanRecord], now: datetime
) -> bool:
    since = prev.ended_at if prev else None
    if since is None:
        since = min((s.start_time for s in spans), default=None)
    if since is None:
        return False
    return now - since > stop.step.deadline


def _deadline_line(
    stop: _StepView, prev: _StepView | None, spans: Sequence[SpanRecord], now: datetime
) -> str:
    since = prev.ended_at if prev else min((s.start_time for s in spans), default=None)
    if since is None:
        return f"{stop.step.id}: deadline {_fmt_age(stop.step.deadline)}"
    age = now - since
    verdict = "overdue" if age > stop.step.deadline else "within"
    return f"{_fmt_age(age)} since {prev.step.id if prev else 'start'} ({verdict} deadline {_fmt_age(stop.step.deadline)})"


def _decide(
    spec: PipelineSpec,
    stop: _StepView,
    prev: _StepView | None,
    views: list[_StepView],
    ev: Evidence,
    now: datetime,
) -> tuple[str, list[str], str]:
    step = stop.step
    spans = ev.spans
    kf = ev.kafka.get(step.id)
    lines: list[str] = []

    # --- the step ran and failed --------------------------------------------------------------
    if stop.marked_without_effect:
        last_ok = stop.ok[-1]
        lines.append(
            f"span {step.id} outcome {_outcome(last_ok)} at {_ts(last_ok.end_time)} (trace {last_ok.trace_id[:16]})"
        )
        if stop.processed:
            p = stop.processed[-1]
            lines.append(
                f"processed_events: {p.event_id} marked by {p.source or '?'} at {_ts(p.processed_at)}"
            )
        else:
            lines.append("processed_events: no mark for this step")
        lines.append(f"{step.table}: no row with correlation_id={ev.correlation_id}")
        action = (
            f"restore the missing {step.table} row for {ev.correlation_id} (or delete its processed_events "
            f"mark and redeliver); make {step.service} verify the effect before marking processed"
        )
        return "marked_without_effect", lines, action

    if stop.status == "failed":
        err = stop.errors[-1]
        lines.append(
            f"span {step.id} error at {_ts(err.end_time or err.start_time)} (trace {err.trace_id[:16]}): {_error_text(err)}"
        )
        if len(stop.errors) > 1:
            lines.append(f"{step.id} failed {len(stop.errors)} times")
        dlq_line = _dlq_line(kf)
        if dlq_line:
            lines.append(dlq_line)
        nxt = spec.next_step(step.id)
        nkf = ev.kafka.get(nxt.id) if nxt else None
        if step.emits and (_topic_error(err) or (nkf is not None and nkf.topic_exists is False)):
            if nkf is not None and nkf.topic_exists is False:
                lines.append(f"topic {step.emits} does not exist")
            return "topic_missing", lines, f"create topic {step.emits} (hoptrace topics ensure)"
        replay = f"; then replay the record from {step.dlq}" if step.dlq else ""
        downstream = _downstream_failure(err, spans)
        if downstream:
            lines.append(f"downstream call failed: {downstream}")
            return (
                "downstream_error",
                lines,
                f"check the service {step.service} depends on ({downstream}){replay}",
            )
        return "processing_error", lines, f"fix {step.service}: {_error_text(err)}{replay}"

    # --- no span for the step ------------------------------------------------------------------
    overdue = _overdue(stop, prev, spans, now)
    deadline = _deadline_line(stop, prev, spans, now)
    kafka_missing = ev.missing.get("kafka")

    if kf is not None and kf.topic_exists is False:
        lines.append(f"topic {kf.topic} does not exist")
        return "topic_missing", lines, f"create topic {kf.topic} (hoptrace topics ensure)"
    nxt = spec.next_step(step.id)
    nkf = ev.kafka.get(nxt.id) if nxt else None
    if step.emits and nkf is not None and nkf.topic_exists is False:
        lines.append(f"topic {step.emits}, which {step.id} emits to, does not exist")
        lines.append(deadline)
        return "topic_missing", lines, f"create topic {step.emits} (hoptrace topics ensure)"

    if kf is not None and kf.dlq is not None:
        lines.append(_dlq_line(kf) or "")
        reason = kf.dlq.reason or "no reason recorded"
        lines.append(f"no span from {step.service} for this record")
        return (
            "processing_error",
            lines,
            f"fix {step.service} ({reason}); then replay the record from {kf.dlq.topic}",
        )

    # traces of later steps are in, this step's span is not
    later_done = [v for v in views[views.index(stop) + 1 :] if v.runs]
    consumed_lines: list[str] = []
    if stop.effect:
        consumed_lines.append(
            f"{step.table}: row present for {ev.correlation_id} but no {step.id} span"
        )
    if stop.processed:
        p = stop.processed[-1]
        consumed_lines.append(
            f"processed_events: {p.event_id} marked by {p.source or '?'} at {_ts(p.processed_at)}, no {step.id} span"
        )
    if kf is not None and kf.record_consumed:
        consumed_lines.append(
            f"group {kf.group} committed offset {kf.committed_offset} past the record {kf.record}"
        )
    if later_done:
        consumed_lines.append(
            f"later steps reported spans: {', '.join(v.step.id for v in later_done)}"
        )
    if consumed_lines:
        lines.extend(consumed_lines)
        lines.append(deadline)
        if overdue:
            return (
                "consumed_without_trace",
                lines,
                f"instrument {step.service}: it handled the record without reporting a span "
                "(an uninstrumented consumer or an old code path)",
            )
        lines.append(f"the {step.id} span may still be on its way")
        return "in_progress", lines, f"wait for {step.id} (deadline {_fmt_age(step.deadline)})"

    if prev is not None and prev.status == "done" and prev.step.emits and prev.emitted is None:
        lines.append(
            f"{prev.step.id} finished ({', '.join(_outcome(s) for s in prev.ok)}) without emitting to {prev.step.emits}"
        )
        if any(_outcome(s) == "duplicate" for s in prev.ok) and not any(
            _outcome(s) == "ok" for s in prev.ok
        ):
            lines.append(
                f"{prev.step.id} only ran as a duplicate (redelivery after the first run was lost)"
            )
        return (
            "not_emitted",
            lines,
            f"re-emit {prev.step.emits} for {ev.correlation_id} from {prev.step.service}; "
            f"fix {prev.step.service} so it emits after writing",
        )

    if kf is None or kafka_missing:
        lines.append(f"Kafka could not be read: {kafka_missing or 'no facts for ' + step.id}")
        lines.append(deadline)
        if not overdue:
            return "in_progress", lines, f"wait for {step.id}; Kafka evidence is missing"
        return (
            "missing_evidence",
            lines,
            "retry when Kafka answers (cannot tell topic, consumer or lag apart)",
        )

    if kf.group_exists is False or kf.group_members == 0:
        state = (
            "does not exist"
            if kf.group_exists is False
            else f"has no members (state {kf.group_state or '?'})"
        )
        lines.append(f"consumer group {kf.group} {state}")
        if kf.record:
            lines.append(f"record {kf.record} waiting; committed offset {kf.committed_offset}")
        if kf.other_groups:
            lines.append(f"other groups consuming {kf.topic}: {', '.join(kf.other_groups)}")
            return (
                "no_consumer",
                lines,
                f"run {step.service} with consumer group {kf.group} (it consumes {kf.topic} as "
                f"{', '.join(kf.other_groups)})",
            )
        return "no_consumer", lines, f"start {step.service}"

    if kf.group_members is None:
        lines.append(f"consumer group {kf.group}: members unknown")
        lines.append(deadline)
        return "missing_evidence", lines, "retry when Kafka answers"

    lines.append(f"consumer group {kf.group}: {kf.group_members} member(s)")
    if kf.record is not None:
        lines.append(
            f"record {kf.record}; committed offset {kf.committed_offset}; end offset {kf.end_offset}; lag {kf.lag}"
        )
    else:
        lines.append(f"record offset unknown; lag on {kf.topic}: {kf.lag}")
    lines.append(deadline)
    if overdue:
        return (
            "consumer_lag",
            lines,
            f"scale or unblock {step.service}: group {kf.group} is {kf.lag} record(s) behind on {kf.topic}",
        )
    return "in_progress", lines, f"wait for {step.id} (deadline {_fmt_age(step.deadline)})"


def _dlq_line(kf: KafkaFacts | None) -> str | None:
    if kf is None or kf.dlq is None:
        return None
    d = kf.dlq
    return f"record in {d.topic}[{d.partition}]@{d.offset}: {d.reason or 'no reason header'}"


def _summary(cause: str, stop: str | None, lines: list[str]) -> str:
    head = {
        "completed": "completed",
        "in_progress": "in progress",
        "topic_missing": "topic missing",
        "no_consumer": "no consumer",
        "consumer_lag": "consumer lag",
        "processing_error": "processing error",
        "downstream_error": "downstream error",
        "marked_without_effect": "marked processed without its effect",
        "not_emitted": "next event not emitted",
        "consumed_without_trace": "consumed without a trace",
        "missing_evidence": "evidence missing",
    }[cause]
    where = f" at {stop}" if stop else ""
    first = f": {lines[0]}" if lines else ""
    return f"{head}{where}{first}"

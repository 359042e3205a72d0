"""Diagnosis: a pure function from gathered evidence to "where did this correlation stop, and why".

``diagnose(spec, evidence, now) -> Diagnosis`` reads no server and no clock: the evidence is
gathered elsewhere (``evidence.py``) and passed in, so every cause code is unit-testable.

Rules, in order, for the first step that is not ``done`` (``stopped_at``):

* the step failed (error span or DLQ record): ``topic_missing`` when the topic it emits to is gone,
  ``downstream_error`` when a downstream call failed, else ``processing_error``;
* the step reported ``ok`` and marked the event processed, but its table has no row:
  ``marked_without_effect`` (both in ``rules_failed.py``);
* no span for the step: ``topic_missing`` (its topic does not exist), ``consumed_without_trace``
  (its effect row / processed mark exists, or its group committed past the record, and the step is
  overdue), ``not_emitted`` (the previous step finished without producing a record),
  ``no_consumer`` (its group has no members), ``consumer_lag`` (members, record not consumed,
  overdue), else ``in_progress`` (``rules_unseen.py``);
* when the source that would decide is unreadable: ``missing_evidence`` with the reason, never a
  guess.

The record types (``SpanRecord``, ``Evidence`` ...) live in ``records.py`` and are re-exported
here for callers of the diagnosis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from hoptrace.contract import (
    CAUSES,
    STATES,
    STATUSES,
    Cause,
    PipelineSpec,
    State,
    StepStatus,
)
from hoptrace.contract.conventions import MSG_GROUP

from .records import (
    SOURCE_SPANS,
    DlqRecord,
    Evidence,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    SpanRecord,
)
from .rules_failed import Verdict, failed_runs, marked_without_effect
from .rules_unseen import unseen
from .spanfacts import consumed_record, emitted_record, is_ok, outcome, span_step
from .stepview import StepView, describe_runs, overdue, processed_marks

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
    #: the evidence this diagnosis was computed from (spans, Kafka facts, processed marks, effect
    #: rows): readers that show the facts take them from here instead of gathering again
    facts: Evidence | None = field(default=None, compare=False, repr=False)

    def step(self, step_id: str) -> StepResult:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


# ----------------------------------------------------------------------------------- diagnose


def _views(spec: PipelineSpec, evidence: Evidence, spans: list[SpanRecord]) -> list[StepView]:
    """One view per spec step, with its runs, marks, effect, emitted record and first status."""
    ids = {s.id for s in spec.steps}
    sources = {n for s in spec.steps for n in (s.service, s.group, s.id) if n}
    processed = list(evidence.processed or ())
    by_step: dict[str, list[SpanRecord]] = {sid: [] for sid in ids}
    for span in spans:
        sid = span_step(span, ids)
        if sid:
            by_step[sid].append(span)
    views: list[StepView] = []
    for step in spec.steps:
        runs = by_step[step.id]
        ok = [s for s in runs if is_ok(s)]
        view = StepView(
            step=step,
            runs=runs,
            ok=ok,
            errors=[s for s in runs if not is_ok(s)],
            processed=processed_marks(spec, step, processed, sources) if step.consumes else [],
            effect=evidence.effects.get(step.id) if step.table else None,
            emitted=emitted_record(step, ok or runs, spans),
            processed_table=spec.processed_for(step).table,
        )
        describe_runs(view)
        if ok:
            view.status = StepStatus.DONE.value
            if step.table and view.effect is False:
                view.status = StepStatus.FAILED.value
                view.marked_without_effect = True
        elif view.errors:
            view.status = StepStatus.FAILED.value
        views.append(view)
    return views


def _decide(
    spec: PipelineSpec,
    stop: StepView,
    prev: StepView | None,
    views: list[StepView],
    ev: Evidence,
    now: datetime,
) -> Verdict:
    if stop.marked_without_effect:
        return marked_without_effect(stop, ev)
    if stop.status == StepStatus.FAILED:
        return failed_runs(spec, stop, ev.spans, ev)
    return unseen(spec, stop, prev, views, ev, now)


def diagnose(spec: PipelineSpec, evidence: Evidence, now: datetime) -> Diagnosis:
    """Where the correlation stopped and why, from evidence alone."""
    spans = sorted(evidence.spans, key=lambda s: s.start_time)
    views = _views(spec, evidence, spans)
    found = (
        bool(spans) or bool(evidence.processed) or any(v is True for v in evidence.effects.values())
    )
    trace_ids = tuple(dict.fromkeys(s.trace_id for s in spans))
    stop = next((v for v in views if v.status != StepStatus.DONE), None)

    cause: Cause
    if SOURCE_SPANS in evidence.missing and not spans:
        cause, lines, action = (
            Cause.MISSING_EVIDENCE,
            [f"spans could not be read: {evidence.missing[SOURCE_SPANS]}"],
            "retry when the span store answers",
        )
        state = State.IN_PROGRESS
        stop_id = stop.step.id if stop else None
    elif stop is None:
        cause, lines, action = Cause.COMPLETED, _completed(views), "nothing to do"
        state, stop_id = State.COMPLETED, None
    else:
        idx = views.index(stop)
        prev = views[idx - 1] if idx > 0 else None
        cause, lines, action = _decide(spec, stop, prev, views, evidence, now)
        stop_id = stop.step.id
        if stop.status not in (StepStatus.DONE, StepStatus.FAILED):
            if cause in (Cause.PROCESSING_ERROR, Cause.DOWNSTREAM_ERROR):
                stop.status = StepStatus.FAILED.value
            elif overdue(stop, prev, spans, now):
                stop.status = StepStatus.STALLED.value
            else:
                stop.status = StepStatus.PENDING.value
        state = {StepStatus.FAILED: State.FAILED, StepStatus.STALLED: State.STALLED}.get(
            StepStatus(stop.status), State.IN_PROGRESS
        )
        for later in views[idx + 1 :]:
            if later.status not in (StepStatus.DONE, StepStatus.FAILED):
                later.status = StepStatus.NOT_REACHED.value

    if not found and cause != Cause.MISSING_EVIDENCE:
        lines = ["no span, processed_events row or effect row carries this correlation id"]
        if evidence.missing:
            lines += [f"{k} could not be read: {v}" for k, v in evidence.missing.items()]

    steps = tuple(
        StepResult(
            id=v.step.id,
            service=v.step.service,
            status=v.status,
            started_at=v.started_at,
            ended_at=v.ended_at,
            runs=len(v.runs),
            outcomes=tuple(outcome(s) for s in v.runs),
            evidence=tuple(v.lines),
            trace_ids=tuple(dict.fromkeys(s.trace_id for s in v.runs)),
            consumed=next((c for c in map(consumed_record, v.ok or v.runs) if c), None),
            emitted=v.emitted,
        )
        for v in views
    )
    return Diagnosis(
        correlation_id=evidence.correlation_id,
        pipeline=spec.name,
        found=found,
        state=(state if found else State.IN_PROGRESS).value,
        stopped_at=stop_id,
        cause=cause.value,
        summary=_summary(cause, stop_id, lines),
        evidence=tuple(lines),
        next_action=action,
        steps=steps,
        trace_ids=trace_ids,
        missing=dict(evidence.missing),
        checked_at=now,
        queries=evidence.queries,
        warnings=_warnings(views),
        facts=evidence,
    )


def _ran_times(v: StepView) -> str:
    return f"{v.step.id} ran {len(v.ok)} times ({', '.join(outcome(s) for s in v.ok)})"


def _warnings(views: list[StepView]) -> tuple[str, ...]:
    out: list[str] = []
    for v in views:
        groups = {str(s.attributes.get(MSG_GROUP)) for s in v.runs if s.attributes.get(MSG_GROUP)}
        for g in sorted(groups - {v.step.group}):
            if v.step.group:
                out.append(
                    f"{v.step.id} was consumed as group {g}, the spec's group is {v.step.group} "
                    "(a worker on a wrong group: check `hoptrace check deploy`)"
                )
        if len(v.ok) > 1:
            out.append(_ran_times(v))
    return tuple(out)


def _completed(views: list[StepView]) -> list[str]:
    return [f"all {len(views)} steps done"] + [_ran_times(v) for v in views if len(v.ok) > 1]


def _summary(cause: Cause, stop: str | None, lines: list[str]) -> str:
    where = f" at {stop}" if stop else ""
    first = f": {lines[0]}" if lines else ""
    return f"{cause.title}{where}{first}"


__all__ = [
    "CAUSES",
    "STATES",
    "STATUSES",
    "Diagnosis",
    "DlqRecord",
    "Evidence",
    "KafkaFacts",
    "ProcessedEvent",
    "RecordRef",
    "SpanRecord",
    "StepResult",
    "diagnose",
    "emitted_record",
]

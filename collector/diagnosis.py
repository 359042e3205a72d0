"""Diagnosis: a pure function from gathered evidence to "where did this correlation stop, and why".

``diagnose(spec, evidence, now) -> Diagnosis`` reads no server and no clock: the evidence is
gathered elsewhere (``evidence.py``) and passed in, so every cause code is unit-testable.

A step's runs are the spans ``StepMatcher.step_of`` says are its runs (``spanfacts.step_runs``):
hoptrace's own step spans, and the consumer/process spans of services hoptrace did not write (a
run of those failed when a span below it in the run failed). A step is *done* when a run ended
``ok`` or ``duplicate`` (and its effect row is not missing). ``stopped_at`` is the first step, in
spec order, that is not done; ``stopped_at_all`` is where every unfinished branch of the DAG
stopped (``branch_heads``), ``stopped_at`` first. Each of those steps gets the status and cause
its rules decide; the correlation's cause is ``stopped_at``'s, the others' causes are in their
steps' evidence. A step below a stopped step is ``not_reached``. A step's deadline counts from
the last of its ``after`` steps (``progress``; a first step: the correlation's first span).

Rules, in order, for a step where a branch stopped:

* the step failed (error run or DLQ record): ``topic_missing`` when the topic it emits to is gone,
  ``downstream_error`` when a downstream call failed, else ``processing_error``;
* the step reported ``ok`` and marked the event processed, but its table has no row:
  ``marked_without_effect`` (both in ``rules_failed.py``);
* no run for the step: ``topic_missing`` (its topic does not exist), ``consumed_without_trace``
  (its effect row / processed mark exists, or its group committed past the record, and the step is
  overdue), ``not_emitted`` (the step it consumes from finished without producing a record),
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
from hoptrace.contract.progress import branch_heads, progress

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
from .spanfacts import (
    consumed_record,
    consumer_group,
    emitted_record,
    is_ok,
    outcome,
    step_runs,
    steps_of,
)
from .stepview import StepView, describe_runs, processed_marks

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
    #: where each unfinished branch stopped (``stopped_at`` first; one entry in a linear
    #: pipeline; empty when completed)
    stopped_at_all: tuple[str, ...] = ()
    #: (trace id, span id) -> step id of every span that is a step run (a timeline's lanes)
    span_steps: Mapping[tuple[str, str], str] = field(
        default_factory=dict, compare=False, repr=False
    )

    def step(self, step_id: str) -> StepResult:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


# ----------------------------------------------------------------------------------- diagnose


def _views(
    spec: PipelineSpec,
    evidence: Evidence,
    spans: list[SpanRecord],
    runs: Mapping[str, list[SpanRecord]],
) -> list[StepView]:
    """One view per spec step, with its runs, marks, effect, emitted record and first status."""
    sources = {n for s in spec.steps for n in (s.service, s.group, s.id) if n}
    processed = list(evidence.processed or ())
    views: list[StepView] = []
    for step in spec.steps:
        step_runs_ = runs[step.id]
        ok = [s for s in step_runs_ if is_ok(s)]
        view = StepView(
            step=step,
            runs=step_runs_,
            ok=ok,
            errors=[s for s in step_runs_ if not is_ok(s)],
            processed=processed_marks(spec, step, processed, sources) if step.consumes else [],
            effect=evidence.effects.get(step.id) if step.table else None,
            emitted=emitted_record(step, ok or step_runs_, spans),
            processed_table=spec.processed_for(step).table,
        )
        describe_runs(view, spans)
        if ok:
            view.status = StepStatus.DONE.value
            if step.table and view.effect is False:
                view.status = StepStatus.FAILED.value
                view.marked_without_effect = True
        elif view.errors:
            view.status = StepStatus.FAILED.value
        views.append(view)
    return views


def _done_at(view: StepView) -> datetime:
    """When a done step was done: its earliest successful end."""
    return min(s.end_time or s.start_time for s in view.ok)


def _deadlines(
    spec: PipelineSpec, views: dict[str, StepView], heads: tuple[str, ...], spans: list[SpanRecord]
) -> None:
    """Set when each stopped step's deadline started: the last of its ``after`` steps was done
    (``progress``; a first step: the correlation's first span)."""
    done_at = {sid: _done_at(v) for sid, v in views.items() if v.status == StepStatus.DONE}
    errored = {sid for sid, v in views.items() if v.errors}
    started = spans[0].start_time if spans else None
    due = {d.step.id: d for d in progress(spec, done_at, errored, started).frontier}
    for sid in heads:
        view = views[sid]
        after = [p for p in view.step.after if p in done_at]
        last = max(after, key=lambda p: done_at[p]) if after else None
        view.since_step = last
        d = due.get(sid)
        if d is not None:
            view.since = d.since
        else:  # passed in progress's eyes (a step below it is done): same arithmetic
            view.since = done_at[last] if last else started


def _decide(
    spec: PipelineSpec, stop: StepView, views: dict[str, StepView], ev: Evidence, now: datetime
) -> Verdict:
    if stop.marked_without_effect:
        return marked_without_effect(stop, ev)
    if stop.status == StepStatus.FAILED:
        return failed_runs(spec, stop, ev.spans, ev)
    emitter = spec.emitter(stop.step.id)
    prev = views[emitter.id] if emitter is not None else None
    return unseen(spec, stop, prev, list(views.values()), ev, now)


def _settle(view: StepView, cause: Cause, now: datetime) -> None:
    """A stopped step's status from its cause and deadline."""
    if view.status in (StepStatus.DONE, StepStatus.FAILED):
        return
    if cause in (Cause.PROCESSING_ERROR, Cause.DOWNSTREAM_ERROR):
        view.status = StepStatus.FAILED.value
    elif view.overdue(now):
        view.status = StepStatus.STALLED.value
    else:
        view.status = StepStatus.PENDING.value


def _state(views: dict[str, StepView], heads: tuple[str, ...]) -> State:
    """failed when a branch stopped on a failed step, else stalled when one is overdue."""
    statuses = {views[sid].status for sid in heads}
    if StepStatus.FAILED in statuses:
        return State.FAILED
    if StepStatus.STALLED in statuses:
        return State.STALLED
    return State.IN_PROGRESS


def diagnose(spec: PipelineSpec, evidence: Evidence, now: datetime) -> Diagnosis:
    """Where the correlation stopped and why, from evidence alone."""
    spans = sorted(evidence.spans, key=lambda s: s.start_time)
    runs = step_runs(spec, spans)
    ordered = _views(spec, evidence, spans, runs)
    views = {v.step.id: v for v in ordered}
    found = (
        bool(spans) or bool(evidence.processed) or any(v is True for v in evidence.effects.values())
    )
    trace_ids = tuple(dict.fromkeys(s.trace_id for s in spans))
    stop = next((v for v in ordered if v.status != StepStatus.DONE), None)
    heads: tuple[str, ...] = ()
    if stop is not None:
        done = {sid for sid, v in views.items() if v.status == StepStatus.DONE}
        heads = (stop.step.id,) + tuple(h for h in branch_heads(spec, done) if h != stop.step.id)
        _deadlines(spec, views, heads, spans)

    cause: Cause
    state: State
    if SOURCE_SPANS in evidence.missing and not spans:
        cause, lines, action = (
            Cause.MISSING_EVIDENCE,
            [f"spans could not be read: {evidence.missing[SOURCE_SPANS]}"],
            "retry when the span store answers",
        )
        state = State.IN_PROGRESS
    elif stop is None:
        cause, lines, action = Cause.COMPLETED, _completed(ordered), "nothing to do"
        state = State.COMPLETED
    else:
        verdicts: dict[str, Verdict] = {}
        for sid in heads:
            verdicts[sid] = _decide(spec, views[sid], views, evidence, now)
            _settle(views[sid], verdicts[sid][0], now)
        cause, lines, action = verdicts[stop.step.id]
        for sid in heads[1:]:  # the other branches' causes, in their steps' evidence
            other, why, todo = verdicts[sid]
            views[sid].lines += [f"branch stopped here: {other.value}", *why, f"next: {todo}"]
        state = _state(views, heads)

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
        for v in ordered
    )
    stop_id = stop.step.id if stop else None
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
        warnings=_warnings(ordered),
        facts=evidence,
        stopped_at_all=heads,
        span_steps=steps_of(runs),
    )


def _ran_times(v: StepView) -> str:
    return f"{v.step.id} ran {len(v.ok)} times ({', '.join(outcome(s) for s in v.ok)})"


def _warnings(views: list[StepView]) -> tuple[str, ...]:
    out: list[str] = []
    for v in views:
        groups = {g for g in map(consumer_group, v.runs) if g}
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

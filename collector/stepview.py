"""One step of one correlation as the diagnosis sees it: its runs (``spanfacts.step_runs``), the
processed marks and effect row it left, the record it emitted, its status, when its deadline
started, and the evidence lines describing it; plus the deadline arithmetic the rules share.

``diagnosis.py`` builds one :class:`StepView` per spec step; the rules (``rules_failed.py``,
``rules_unseen.py``) read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hoptrace.contract import Outcome, PipelineSpec, Step, StepStatus
from hoptrace.contract.conventions import STATUS_ERROR

from .records import Evidence, KafkaFacts, ProcessedEvent, RecordRef, SpanRecord
from .spanfacts import consumed_record, consumer_group, outcome, run_error_text, ts


@dataclass
class StepView:
    step: Step
    runs: list[SpanRecord]
    ok: list[SpanRecord]
    errors: list[SpanRecord]
    processed: list[ProcessedEvent]
    effect: bool | None
    emitted: RecordRef | None
    #: the table the step's processed marks are in (evidence lines name it)
    processed_table: str
    status: str = StepStatus.NOT_REACHED.value
    lines: list[str] = field(default_factory=list)
    marked_without_effect: bool = False
    #: when the step's deadline started (the last of its ``after`` steps was done; a first
    #: step: the correlation's first span), and the step it counts from (None: the start)
    since: datetime | None = None
    since_step: str | None = None

    def overdue(self, now: datetime) -> bool:
        return self.since is not None and now - self.since > self.step.deadline

    @property
    def started_at(self) -> datetime | None:
        return min((s.start_time for s in self.runs), default=None)

    @property
    def ended_at(self) -> datetime | None:
        ends = [s.end_time for s in (self.ok or self.runs) if s.end_time]
        return max(ends, default=None)


def processed_marks(
    spec: PipelineSpec, step: Step, processed: Sequence[ProcessedEvent], known_sources: set[str]
) -> list[ProcessedEvent]:
    """The processed marks of a step (from its processed table): by its source naming the step
    (its id, its group, or its service when no other step of the spec shares that service), else
    by the type of the event it consumes (``step.event_type``) when the source names nothing of
    the pipeline and no other step consumes that event type. Two steps consuming one event (a
    fan-out) each mark it under their own source, and each mark is only its step's."""
    table = spec.processed_for(step).table
    return [
        p
        for p in processed
        if (p.table is None or p.table == table) and _marks_step(spec, step, p, known_sources)
    ]


def _marks_step(spec: PipelineSpec, step: Step, p: ProcessedEvent, known: set[str]) -> bool:
    if p.source is not None and p.source in known:
        if p.source in (step.id, step.group):
            return True
        if p.source != step.service:
            return False
        sharing = [s for s in spec.steps if s.consumes and p.source in (s.service, s.group, s.id)]
        return sharing == [step]
    etype = step.event_type
    if not etype or p.event_type != etype:
        return False
    return [s.id for s in spec.steps if s.event_type == etype] == [step.id]


def describe_runs(view: StepView, spans: Sequence[SpanRecord]) -> None:
    """The step's evidence lines: each run, the emitted record, processed marks, effect row."""
    step = view.step
    for span in view.runs:
        by = f" from {span.service}" if span.matched else ""  # not a span hoptrace made
        line = (
            f"span {span.name}{by} {outcome(span)} at {ts(span.start_time)} "
            f"(trace {span.trace_id[:16]})"
        )
        consumed = consumed_record(span)
        if consumed:
            line += f", consumed {consumed}"
            group = consumer_group(span)
            if group:
                line += f" as group {group}"
                if step.group and group != step.group:
                    line += f" (spec expects {step.group})"
        if span.status_code == STATUS_ERROR or outcome(span) == Outcome.ERROR:
            line += f": {run_error_text(span, spans)}"
        view.lines.append(line)
    if view.emitted:
        view.lines.append(f"emitted {view.emitted}")
    for p in view.processed:
        view.lines.append(
            f"{view.processed_table}: {p.event_type or '?'} {p.event_id or '?'} "
            f"by {p.source or '?'} at {ts(p.processed_at)}"
        )
    if step.table and view.effect is not None:
        view.lines.append(f"{step.table}: {'row present' if view.effect else 'no row'}")


def fmt_age(delta: timedelta) -> str:
    secs = delta.total_seconds()
    if secs < 120:
        return f"{secs:.1f}s"
    if secs < 7200:
        return f"{secs / 60:.1f}m"
    return f"{secs / 3600:.1f}h"


def deadline_line(view: StepView, now: datetime) -> str:
    """How long the step has been due for, against its deadline."""
    if view.since is None:
        return f"{view.step.id}: deadline {fmt_age(view.step.deadline)}"
    age = now - view.since
    verdict = "overdue" if age > view.step.deadline else "within"
    return (
        f"{fmt_age(age)} since {view.since_step or 'start'} "
        f"({verdict} deadline {fmt_age(view.step.deadline)})"
    )


def dlq_line(kf: KafkaFacts | None) -> str | None:
    if kf is None or kf.dlq is None:
        return None
    d = kf.dlq
    return f"record in {d.topic}[{d.partition}]@{d.offset}: {d.reason or 'no reason header'}"


def redrive_lines(evidence: Evidence | None, step_id: str) -> list[str]:
    """The evidence lines of the step's audited redrives (``hoptrace redrive``), oldest first."""
    if evidence is None:
        return []
    return [r.line() for r in evidence.redrives if r.step == step_id]

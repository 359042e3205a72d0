"""One step of one correlation as the diagnosis sees it: its runs (step spans), the processed marks
and effect row it left, the record it emitted, its status, and the evidence lines describing it;
plus the deadline arithmetic the rules share.

``diagnosis.py`` builds one :class:`StepView` per spec step; the rules (``rules_failed.py``,
``rules_unseen.py``) read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hoptrace.contract import Outcome, PipelineSpec, Step, StepStatus
from hoptrace.contract.conventions import MSG_GROUP, STATUS_ERROR

from .records import KafkaFacts, ProcessedEvent, RecordRef, SpanRecord
from .spanfacts import consumed_record, error_text, outcome, ts


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
    """The processed marks of a step (from its processed table): by its service/group/id as
    source, else by the type of the event it consumes (``step.event_type``) when the source names
    nothing of the pipeline."""
    table = spec.processed_for(step).table
    names = {step.service, step.group, step.id} - {None}
    etype = step.event_type
    return [
        p
        for p in processed
        if (p.table is None or p.table == table)
        and (
            p.source in names
            or (
                etype
                and p.event_type == etype
                and (p.source is None or p.source not in known_sources)
            )
        )
    ]


def describe_runs(view: StepView) -> None:
    """The step's evidence lines: each run, the emitted record, processed marks, effect row."""
    step = view.step
    for span in view.runs:
        line = (
            f"span {span.name} {outcome(span)} at {ts(span.start_time)} "
            f"(trace {span.trace_id[:16]})"
        )
        consumed = consumed_record(span)
        if consumed:
            line += f", consumed {consumed}"
            group = span.attributes.get(MSG_GROUP)
            if group:
                line += f" as group {group}"
                if step.group and group != step.group:
                    line += f" (spec expects {step.group})"
        if span.status_code == STATUS_ERROR or outcome(span) == Outcome.ERROR:
            line += f": {error_text(span)}"
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


def _since(prev: StepView | None, spans: Sequence[SpanRecord]) -> datetime | None:
    """When the step's deadline started: the previous step's end, else the first span."""
    since = prev.ended_at if prev else None
    if since is None:
        since = min((s.start_time for s in spans), default=None)
    return since


def overdue(
    stop: StepView, prev: StepView | None, spans: Sequence[SpanRecord], now: datetime
) -> bool:
    since = _since(prev, spans)
    if since is None:
        return False
    return now - since > stop.step.deadline


def deadline_line(
    stop: StepView, prev: StepView | None, spans: Sequence[SpanRecord], now: datetime
) -> str:
    since = prev.ended_at if prev else min((s.start_time for s in spans), default=None)
    if since is None:
        return f"{stop.step.id}: deadline {fmt_age(stop.step.deadline)}"
    age = now - since
    verdict = "overdue" if age > stop.step.deadline else "within"
    return (
        f"{fmt_age(age)} since {prev.step.id if prev else 'start'} "
        f"({verdict} deadline {fmt_age(stop.step.deadline)})"
    )


def dlq_line(kf: KafkaFacts | None) -> str | None:
    if kf is None or kf.dlq is None:
        return None
    d = kf.dlq
    return f"record in {d.topic}[{d.partition}]@{d.offset}: {d.reason or 'no reason header'}"

"""Diagnosis rules for a step with no successful run: its topic is missing, its record was
dead-lettered, it was consumed without a trace, the step whose record it consumes
(``spec.emitter``) never emitted, Kafka could not be read, its group has no consumer (naming the
other groups that consume its topic instead: a wrong group id), its group lags, or it is simply
not due yet.

In order: ``topic_missing`` (its topic, or the topic it emits to, does not exist),
``processing_error`` (a dead-lettered record and no span), ``consumed_without_trace`` (effect row,
processed mark, committed offset or spans of steps below it say it ran, and it is overdue),
``not_emitted``, ``missing_evidence`` (Kafka unreadable and overdue), ``no_consumer``,
``consumer_lag`` (overdue), else ``in_progress``.
"""

from __future__ import annotations

from datetime import datetime

from hoptrace.contract import Cause, Outcome, PipelineSpec, StepStatus
from hoptrace.contract.progress import descendants

from .records import SOURCE_KAFKA, Evidence, KafkaFacts
from .rules_failed import Verdict, emitted_topic_missing
from .spanfacts import outcome, ts
from .stepview import StepView, deadline_line, dlq_line, fmt_age


def unseen(
    spec: PipelineSpec,
    stop: StepView,
    prev: StepView | None,
    views: list[StepView],
    ev: Evidence,
    now: datetime,
) -> Verdict:
    """Why a step where the correlation stopped has not run (successfully) yet. ``prev``: the
    view of the step whose record it consumes (``spec.emitter``)."""
    step = stop.step
    kf = ev.kafka.get(step.id)
    lines: list[str] = []
    is_overdue = stop.overdue(now)
    deadline = deadline_line(stop, now)
    kafka_missing = ev.missing.get(SOURCE_KAFKA)

    if kf is not None and kf.topic_exists is False:
        lines.append(f"topic {kf.topic} does not exist")
        return Cause.TOPIC_MISSING, lines, f"create topic {kf.topic} (hoptrace topics ensure)"
    if step.emits and emitted_topic_missing(spec, step, ev):
        lines.append(f"topic {step.emits}, which {step.id} emits to, does not exist")
        lines.append(deadline)
        return Cause.TOPIC_MISSING, lines, f"create topic {step.emits} (hoptrace topics ensure)"

    if kf is not None and kf.dlq is not None:
        lines.append(dlq_line(kf) or "")
        reason = kf.dlq.reason or "no reason recorded"
        lines.append(f"no span from {step.service} for this record")
        return (
            Cause.PROCESSING_ERROR,
            lines,
            f"fix {step.service} ({reason}); then replay the record from {kf.dlq.topic}",
        )

    consumed = _consumed_lines(spec, stop, views, ev)
    if consumed:
        lines.extend(consumed)
        lines.append(deadline)
        if is_overdue:
            return (
                Cause.CONSUMED_WITHOUT_TRACE,
                lines,
                f"instrument {step.service}: it handled the record without reporting a span "
                "(an uninstrumented consumer or an old code path)",
            )
        lines.append(f"the {step.id} span may still be on its way")
        return Cause.IN_PROGRESS, lines, f"wait for {step.id} (deadline {fmt_age(step.deadline)})"

    if (
        prev is not None
        and prev.status == StepStatus.DONE
        and prev.step.emits
        and prev.emitted is None
    ):
        return _not_emitted(prev, ev)

    if kf is None or kafka_missing:
        lines.append(f"Kafka could not be read: {kafka_missing or 'no facts for ' + step.id}")
        lines.append(deadline)
        if not is_overdue:
            return Cause.IN_PROGRESS, lines, f"wait for {step.id}; Kafka evidence is missing"
        return (
            Cause.MISSING_EVIDENCE,
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
            lines.append(f"record {kf.record} waiting; {_committed(kf.committed_offset)}")
        if kf.other_groups:
            lines.extend(_other_group_lines(kf))
            return (
                Cause.NO_CONSUMER,
                lines,
                f"fix the group id of {step.service}: run it with consumer group {kf.group} "
                f"(it consumes {kf.topic} as {', '.join(kf.other_groups)})",
            )
        return Cause.NO_CONSUMER, lines, f"start {step.service}"

    if kf.group_members is None:
        lines.append(f"consumer group {kf.group}: members unknown")
        lines.append(deadline)
        return Cause.MISSING_EVIDENCE, lines, "retry when Kafka answers"

    lines.append(f"consumer group {kf.group}: {kf.group_members} member(s)")
    if kf.record is not None:
        lines.append(
            f"record {kf.record}; {_committed(kf.committed_offset)}; "
            f"end offset {kf.end_offset}; lag {kf.lag}"
        )
    else:
        lines.append(f"record offset unknown; lag on {kf.topic}: {kf.lag}")
    lines.append(deadline)
    if is_overdue:
        return (
            Cause.CONSUMER_LAG,
            lines,
            f"scale or unblock {step.service}: group {kf.group} is {kf.lag} record(s) behind "
            f"on {kf.topic}",
        )
    return Cause.IN_PROGRESS, lines, f"wait for {step.id} (deadline {fmt_age(step.deadline)})"


def _other_group_lines(kf: KafkaFacts) -> list[str]:
    """Who consumes the step's topic instead: each other group, its live members (client id,
    host, assigned partitions) and whether it committed anything there."""
    members = kf.other_members or ()
    out: list[str] = []
    for group in kf.other_groups or ():
        live = [m for m in members if m.group == group]
        if live:
            who = "; ".join(str(m) for m in live)
            out.append(f"group {group} consumes {kf.topic}: {len(live)} live member(s): {who}")
        else:
            out.append(f"group {group} committed offsets on {kf.topic} (no live member seen)")
    return out


def _consumed_lines(
    spec: PipelineSpec, stop: StepView, views: list[StepView], ev: Evidence
) -> list[str]:
    """What says the step handled the record although it reported no span."""
    step = stop.step
    kf = ev.kafka.get(step.id)
    below = descendants(spec, step.id)
    later_done = [v for v in views if v.step.id in below and v.runs]
    lines: list[str] = []
    if stop.effect:
        lines.append(f"{step.table}: row present for {ev.correlation_id} but no {step.id} span")
    if stop.processed:
        p = stop.processed[-1]
        lines.append(
            f"{stop.processed_table}: {p.event_id or '?'} marked by {p.source or '?'} "
            f"at {ts(p.processed_at)}, no {step.id} span"
        )
    if kf is not None and kf.record_consumed:
        lines.append(
            f"group {kf.group} committed offset {kf.committed_offset} past the record {kf.record}"
        )
    if later_done:
        lines.append(f"later steps reported spans: {', '.join(v.step.id for v in later_done)}")
    return lines


def _not_emitted(prev: StepView, ev: Evidence) -> Verdict:
    """The previous step finished without producing the record this step consumes."""
    ran = [outcome(s) for s in prev.ok]
    lines = [f"{prev.step.id} finished ({', '.join(ran)}) without emitting to {prev.step.emits}"]
    if Outcome.DUPLICATE in ran and Outcome.OK not in ran:
        lines.append(
            f"{prev.step.id} only ran as a duplicate (redelivery after the first run was lost)"
        )
    return (
        Cause.NOT_EMITTED,
        lines,
        f"re-emit {prev.step.emits} for {ev.correlation_id} from {prev.step.service}; "
        f"fix {prev.step.service} so it emits after writing",
    )


def _committed(offset: int | None) -> str:
    """The group's committed offset in words (none yet: the group never committed on it)."""
    return "no committed offset" if offset is None else f"committed offset {offset}"

"""Diagnosis rules for a step that ran and failed: it reported ``ok`` and marked the event
processed without writing its effect row (``marked_without_effect``), or its runs errored
(``topic_missing`` when the topic it emits to is gone, ``downstream_error`` when a call to the
service it depends on failed, else ``processing_error``).
"""

from __future__ import annotations

from collections.abc import Sequence

from hoptrace.contract import Cause, PipelineSpec, Step

from .records import Evidence, SpanRecord
from .spanfacts import downstream_failure, outcome, run_error_text, topic_error, ts
from .stepview import StepView, dlq_line

#: A rule's answer: the cause, the evidence lines that decided it, what to do next.
Verdict = tuple[Cause, list[str], str]


def emitted_topic_missing(spec: PipelineSpec, step: Step, ev: Evidence) -> bool:
    """Kafka says the topic ``step`` emits to does not exist (as read for its consumers)."""
    if not step.emits:
        return False
    for consumer in spec.consumers_of(step.emits):
        kf = ev.kafka.get(consumer.id)
        if kf is not None and kf.topic_exists is False:
            return True
    return False


def marked_without_effect(stop: StepView, ev: Evidence) -> Verdict:
    """The step reported success and marked the event processed, but its effect row is absent."""
    step = stop.step
    table = stop.processed_table
    last_ok = stop.ok[-1]
    lines = [
        f"span {step.id} outcome {outcome(last_ok)} at {ts(last_ok.end_time)} "
        f"(trace {last_ok.trace_id[:16]})"
    ]
    if stop.processed:
        p = stop.processed[-1]
        lines.append(
            f"{table}: {p.event_id or '?'} marked by {p.source or '?'} at {ts(p.processed_at)}"
        )
    else:
        lines.append(f"{table}: no mark for this step")
    lines.append(f"{step.table}: no row with {step.correlation_column}={ev.correlation_id}")
    action = (
        f"restore the missing {step.table} row for {ev.correlation_id} (or delete its {table} "
        f"mark and redeliver); make {step.service} verify the effect before marking processed"
    )
    return Cause.MARKED_WITHOUT_EFFECT, lines, action


def failed_runs(
    spec: PipelineSpec, stop: StepView, spans: Sequence[SpanRecord], ev: Evidence
) -> Verdict:
    """The step's runs errored: a missing emit topic, a failed downstream call, or its own error."""
    step = stop.step
    err = stop.errors[-1]
    why = run_error_text(err, spans)
    lines = [
        f"span {step.id} error at {ts(err.end_time or err.start_time)} "
        f"(trace {err.trace_id[:16]}): {why}"
    ]
    if len(stop.errors) > 1:
        lines.append(f"{step.id} failed {len(stop.errors)} times")
    dlq = dlq_line(ev.kafka.get(step.id))
    if dlq:
        lines.append(dlq)
    emit_missing = emitted_topic_missing(spec, step, ev)
    if step.emits and (topic_error(err) or emit_missing):
        if emit_missing:
            lines.append(f"topic {step.emits} does not exist")
        return Cause.TOPIC_MISSING, lines, f"create topic {step.emits} (hoptrace topics ensure)"
    replay = f"; then replay the record from {step.dlq}" if step.dlq else ""
    downstream = downstream_failure(step, err, spans)
    if downstream:
        lines.append(f"downstream call failed: {downstream}")
        return (
            Cause.DOWNSTREAM_ERROR,
            lines,
            f"check the service {step.service} depends on ({downstream}){replay}",
        )
    return Cause.PROCESSING_ERROR, lines, f"fix {step.service}: {why}{replay}"

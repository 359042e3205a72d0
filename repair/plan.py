"""The safe action per cause, decided from a diagnosis and what ``sources`` found, reading no
server (unit-tested per cause).

One action per branch where the correlation stopped (``Diagnosis.stopped_at_all``): fan-out
branches are redriven each on its own; two branches served by one record send it once.

* ``no_consumer``, ``topic_missing``, ``consumer_lag``, ``in_progress``: while the record is in
  its topic, nothing to send (it will flow once the consumer runs / the topic exists); once it
  has left the topic, re-emit the event the emitting step stored;
* ``processing_error``, ``downstream_error``: re-publish the dead-lettered record;
* ``marked_without_effect``: remove the step's processed mark, re-publish its input record;
* ``not_emitted``: re-emit the producer's stored event (its outbox, or hoptrace's ledger);
* ``consumed_without_trace``: re-publish the input record;
* ``completed``: nothing to do; ``missing_evidence``, or any source unreadable: refuse.

A step whose previous redrive is still in flight sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hoptrace.contract import Cause, PipelineSpec

#: How the diagnosis names the cause of a branch other than ``stopped_at`` in its step.
BRANCH_PREFIX = "branch stopped here: "


class Kind(StrEnum):
    """What a redrive does for one step."""

    REPUBLISH_DEAD_LETTER = "republish_dead_letter"
    REPUBLISH_INPUT = "republish_input"
    REEMIT_STORED = "reemit_stored"
    WAIT = "wait"
    NOTHING = "nothing"
    IN_FLIGHT = "in_flight"
    REFUSE = "refuse"

    @property
    def sends(self) -> bool:
        return self in (Kind.REPUBLISH_DEAD_LETTER, Kind.REPUBLISH_INPUT, Kind.REEMIT_STORED)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record to send again: its value, key and headers, and where it was found."""

    where: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """A processed mark of a step: its table, the predicate that finds it, the event id."""

    table: str
    event_id: str | None
    where_sql: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.table} mark of event {self.event_id or '?'}"


@dataclass(frozen=True, slots=True)
class Found:
    """What ``sources`` found for one step where a branch stopped."""

    step: str
    #: topics the action needs that do not exist (the consumed one, the emitted one)
    missing_topics: tuple[str, ...] = ()
    #: where the input record should be (``topic[p]@o``; None: not known)
    input_ref: str | None = None
    #: the input record, still in its topic (verified to be this correlation's)
    input_record: StoredRecord | None = None
    #: the dead-lettered record of the step
    dead_letter: StoredRecord | None = None
    #: the event the emitting step stored (its outbox, or hoptrace's ledger), and why not
    stored: StoredRecord | None = None
    stored_missing: str | None = None
    #: the step's processed mark of this correlation
    mark: Mark | None = None
    #: a previous redrive of this step still in flight (why), else None
    in_flight: str | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """One step's redrive: what it does, why, the record and where it goes, the mark it
    removes, the traces it resumes."""

    correlation_id: str
    step: str
    cause: str
    kind: Kind
    reason: str
    record: StoredRecord | None = None
    topic: str | None = None
    remove_mark: Mark | None = None
    origin_traces: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line: what it would do (dry run) or did."""
        if not self.kind.sends:
            return self.reason
        assert self.record is not None
        what = f"send {self.record.where} to {self.topic}"
        if self.remove_mark is not None:
            what = f"remove the {self.remove_mark}, then {what}"
        return f"{what} ({self.reason})"


def _cause_of(diagnosis: Any, step: str) -> str:
    if step == diagnosis.stopped_at:
        return str(diagnosis.cause)
    for line in diagnosis.step(step).evidence:
        if line.startswith(BRANCH_PREFIX):
            return line.removeprefix(BRANCH_PREFIX)
    return str(diagnosis.cause)


def plan(spec: PipelineSpec, diagnosis: Any, found: Mapping[str, Found]) -> list[Action]:
    """The action per stopped branch (one ``NOTHING`` when the correlation completed)."""
    cid = diagnosis.correlation_id
    traces = tuple(diagnosis.trace_ids)
    if diagnosis.cause == Cause.COMPLETED or not diagnosis.stopped_at:
        why = "completed: every step is done, nothing to redrive"
        if diagnosis.cause == Cause.MISSING_EVIDENCE:
            return [_refuse(cid, "-", diagnosis.cause, _missing(diagnosis), traces)]
        return [Action(cid, "-", str(diagnosis.cause), Kind.NOTHING, why, origin_traces=traces)]
    heads = list(diagnosis.stopped_at_all) or [diagnosis.stopped_at]
    if diagnosis.missing:  # a source was unreadable: whatever the cause, do not act on it
        return [
            _refuse(cid, sid, _cause_of(diagnosis, sid), _missing(diagnosis), traces)
            for sid in heads
        ]
    out: list[Action] = []
    sent: set[tuple[str | None, str | None]] = set()
    for sid in heads:
        cause = _cause_of(diagnosis, sid)
        act = decide(spec, cid, sid, cause, found.get(sid, Found(sid)), diagnosis, traces)
        if act.kind.sends:
            key = (act.topic, act.record.event_id if act.record else None)
            if key in sent and key[1] is not None:
                act = Action(
                    cid,
                    sid,
                    cause,
                    Kind.NOTHING,
                    f"the record sent for another branch on {act.topic} serves this one too",
                    origin_traces=traces,
                )
            sent.add(key)
        out.append(act)
    return out


def _missing(diagnosis: Any) -> str:
    what = "; ".join(f"{k}: {v}" for k, v in dict(diagnosis.missing).items()) or "unknown"
    return f"evidence missing ({what}): redrive does not act on a guess; retry when it answers"


def _refuse(cid: str, step: str, cause: str, why: str, traces: tuple[str, ...]) -> Action:
    return Action(cid, step, str(cause), Kind.REFUSE, why, origin_traces=traces)


def decide(
    spec: PipelineSpec,
    cid: str,
    sid: str,
    cause: str,
    f: Found,
    diagnosis: Any = None,
    traces: Sequence[str] = (),
) -> Action:
    """The action for one step where a branch stopped with ``cause``."""
    step = spec.step(sid)
    traces = tuple(traces)
    topic = step.consumes or step.emits

    def act(kind: Kind, why: str, record: StoredRecord | None = None, mark: Mark | None = None):
        return Action(cid, sid, cause, kind, why, record, topic, mark, traces)

    def refuse(why: str) -> Action:
        return _refuse(cid, sid, cause, why, traces)

    if cause == Cause.COMPLETED:
        return act(Kind.NOTHING, "completed: nothing to redrive")
    if cause == Cause.MISSING_EVIDENCE:
        return refuse(_missing(diagnosis) if diagnosis is not None else "evidence missing")
    if f.missing_topics:
        gone = ", ".join(f.missing_topics)
        return refuse(
            f"topic {gone} does not exist: create it (hoptrace topics ensure), then redrive"
        )
    stored_or_refuse = (
        (lambda why: act(Kind.REEMIT_STORED, why, f.stored))
        if f.stored is not None
        else (lambda _why: refuse(f.stored_missing or "no stored event to re-emit"))
    )
    if f.in_flight is not None:
        return act(Kind.IN_FLIGHT, f"nothing sent: {f.in_flight}")

    if cause in (Cause.NO_CONSUMER, Cause.TOPIC_MISSING, Cause.CONSUMER_LAG, Cause.IN_PROGRESS):
        if not step.consumes:  # a first step: its producer keeps the event
            if f.stored is not None:
                return act(
                    Kind.WAIT,
                    f"the producer keeps its event in {f.stored.where}: it will flow once "
                    f"{step.service} can emit to {step.emits}",
                )
            return refuse(f.stored_missing or f"{step.service} keeps no event to re-emit")
        if f.input_record is not None:
            return act(Kind.WAIT, _waiting(cause, step, f))
        if cause == Cause.IN_PROGRESS and f.input_ref is None:
            return act(Kind.WAIT, f"in progress: {sid} is not overdue yet, nothing to send")
        if f.input_ref is None:
            return refuse(
                f"cannot tell whether this correlation's record is still in {step.consumes} "
                "(no emitted record is known): nothing sent"
            )
        return stored_or_refuse(f"record {f.input_ref} has left {step.consumes}")
    if cause in (Cause.PROCESSING_ERROR, Cause.DOWNSTREAM_ERROR):
        if f.dead_letter is not None:
            return act(Kind.REPUBLISH_DEAD_LETTER, "the dead-lettered record", f.dead_letter)
        return refuse(
            f"no dead-lettered record of {cid} found in {step.dlq or 'a dead-letter topic'} "
            "(the step may still be retrying): nothing sent"
        )
    if cause == Cause.MARKED_WITHOUT_EFFECT:
        if f.mark is None:
            return refuse(f"no processed mark of {sid} found for {cid}: nothing to remove")
        if f.input_record is not None:
            return act(Kind.REPUBLISH_INPUT, "its input record", f.input_record, f.mark)
        if f.stored is not None:
            return act(Kind.REEMIT_STORED, "its input, as the emitter stored it", f.stored, f.mark)
        return refuse(f.stored_missing or "its input record is nowhere to be found")
    if cause == Cause.NOT_EMITTED:
        return stored_or_refuse("the producer's stored event, never emitted")
    if cause == Cause.CONSUMED_WITHOUT_TRACE:
        if f.input_record is not None:
            return act(Kind.REPUBLISH_INPUT, "its input record", f.input_record)
        return stored_or_refuse("its input, as the emitter stored it")
    return refuse(f"no redrive is defined for cause {cause}")


def _waiting(cause: str, step: Any, f: Found) -> str:
    where = f"record {f.input_ref} is still in {step.consumes}"
    if cause == Cause.NO_CONSUMER:
        return (
            f"nothing to send: {where}; it will flow once {step.service} (group {step.group}) runs"
        )
    if cause == Cause.TOPIC_MISSING:
        return f"nothing to send: {where}; it will flow once the topic exists"
    if cause == Cause.CONSUMER_LAG:
        return f"nothing to send: {where}; it will flow once group {step.group} reaches it"
    return f"nothing to send: {where}; in progress"

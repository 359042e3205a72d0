"""Diagnosis vocabulary: cause codes (each with a title and a one-line meaning), step statuses,
correlation states, step-run outcomes and the trace JSON schema version.

Every part that names one of these imports it from here (``hoptrace.contract``); the values are
the strings the CLI, the read API, the alerts and the trace JSON carry.
"""

from __future__ import annotations

from enum import StrEnum

#: ``version`` of ``hoptrace trace --format json`` (docs/trace-json-schema.json).
TRACE_SCHEMA_VERSION = 1


class Cause(StrEnum):
    """Why a correlation stopped where it did (one per diagnosis)."""

    COMPLETED = "completed"
    IN_PROGRESS = "in_progress"
    TOPIC_MISSING = "topic_missing"
    NO_CONSUMER = "no_consumer"
    CONSUMER_LAG = "consumer_lag"
    PROCESSING_ERROR = "processing_error"
    DOWNSTREAM_ERROR = "downstream_error"
    MARKED_WITHOUT_EFFECT = "marked_without_effect"
    NOT_EMITTED = "not_emitted"
    CONSUMED_WITHOUT_TRACE = "consumed_without_trace"
    MISSING_EVIDENCE = "missing_evidence"

    @property
    def title(self) -> str:
        """A few words for a summary line (``"consumer lag"``)."""
        return _TITLES[self]

    @property
    def meaning(self) -> str:
        """One sentence a person reads (dashboard, alerts)."""
        return _MEANINGS[self]


_TITLES: dict[Cause, str] = {
    Cause.COMPLETED: "completed",
    Cause.IN_PROGRESS: "in progress",
    Cause.TOPIC_MISSING: "topic missing",
    Cause.NO_CONSUMER: "no consumer",
    Cause.CONSUMER_LAG: "consumer lag",
    Cause.PROCESSING_ERROR: "processing error",
    Cause.DOWNSTREAM_ERROR: "downstream error",
    Cause.MARKED_WITHOUT_EFFECT: "marked processed without its effect",
    Cause.NOT_EMITTED: "next event not emitted",
    Cause.CONSUMED_WITHOUT_TRACE: "consumed without a trace",
    Cause.MISSING_EVIDENCE: "evidence missing",
}

_MEANINGS: dict[Cause, str] = {
    Cause.COMPLETED: "Every step finished: the payment went all the way through the pipeline.",
    Cause.IN_PROGRESS: "The payment is still moving: the next step is not overdue yet.",
    Cause.TOPIC_MISSING: (
        "The topic this step reads from does not exist, so the event had nowhere to go."
    ),
    Cause.NO_CONSUMER: (
        "Nobody is consuming the topic: the step's consumer group has no running members."
    ),
    Cause.CONSUMER_LAG: (
        "The event is waiting in the topic: the consumer group is behind (lag) and has not "
        "reached it yet."
    ),
    Cause.PROCESSING_ERROR: "The worker received the event but failed while handling it.",
    Cause.DOWNSTREAM_ERROR: "The worker called a downstream service, and that call failed.",
    Cause.MARKED_WITHOUT_EFFECT: (
        "The event was marked processed, but the row it should have written does not exist."
    ),
    Cause.NOT_EMITTED: "The previous step finished but never emitted the event for this step.",
    Cause.MISSING_EVIDENCE: (
        "hoptrace could not read a source it needs to decide (see the evidence below), so it "
        "does not guess."
    ),
    Cause.CONSUMED_WITHOUT_TRACE: (
        "The event was consumed (offset committed) but no span was recorded: an uninstrumented "
        "consumer or another code path handled it."
    ),
}

#: Every cause code, in the documented order.
CAUSES: tuple[str, ...] = tuple(c.value for c in Cause)


class StepStatus(StrEnum):
    """A step's status within one correlation."""

    DONE = "done"
    FAILED = "failed"
    PENDING = "pending"
    STALLED = "stalled"
    NOT_REACHED = "not_reached"


STATUSES: tuple[str, ...] = tuple(s.value for s in StepStatus)


class State(StrEnum):
    """A correlation's state (the store's ``correlations.state``)."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    STALLED = "stalled"


#: States in the order people read them (overview, lists).
STATES: tuple[str, ...] = (State.COMPLETED, State.IN_PROGRESS, State.STALLED, State.FAILED)


class Outcome(StrEnum):
    """What one execution of a step reported (``hoptrace.step.outcome``)."""

    OK = "ok"
    ERROR = "error"
    DUPLICATE = "duplicate"


OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)


class RedriveResult(StrEnum):
    """What became of one redrive action (the ``redrives`` table's ``result``: written by
    ``hoptrace redrive``, read back into a lookup's evidence)."""

    SENDING = "sending"  # written before the send: its id travels in the record's header
    SENT = "sent"
    FAILED = "failed"
    WAITING = "waiting"  # the record is still in its topic: it flows once the consumer runs
    NOTHING = "nothing"
    IN_FLIGHT = "in_flight"  # an earlier redrive of the step is on its way
    REFUSED = "refused"

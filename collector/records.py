"""The collector's record types: one stored span, a Kafka record reference, the Kafka, dead-letter
and database facts of one correlation, and the :class:`Evidence` that holds them all.

The span store returns these (``store.spans_for_correlation``), the evidence gathering fills them
(``evidence.py``) and the diagnosis reads them (``diagnosis.py``): one type per thing, no
conversions between the three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hoptrace.contract.conventions import MESSAGING_SYSTEM_KAFKA

#: Names of the evidence sources: keys of ``Evidence.missing`` and ``Evidence.timings_ms`` (and of
#: the trace JSON's ``missing_evidence``).
SOURCE_SPANS = "spans"
SOURCE_DATABASE = "database"
SOURCE_KAFKA = MESSAGING_SYSTEM_KAFKA  # the messaging system itself
SOURCE_OTHER_GROUPS = f"{SOURCE_KAFKA} (other groups)"
SOURCE_DEAD_LETTERS = f"{SOURCE_KAFKA} (dead letters)"


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One stored span (ids are lowercase hex; ``status_code`` 0 unset, 1 ok, 2 error).

    The store fills every field; code that builds spans by hand (tests, fixtures) may leave the
    store's bookkeeping (``duration_us``, ``received_at``, ``resource`` ...) at its default."""

    trace_id: str
    span_id: str
    name: str
    service: str
    start_time: datetime
    end_time: datetime | None = None
    parent_span_id: str | None = None
    kind: int | str | None = None
    status_code: int = 0
    status_message: str | None = None
    step: str | None = None
    outcome: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[Mapping[str, Any]] = ()
    duration_us: int | None = None
    correlation_id: str | None = None
    pipeline: str | None = None
    received_at: datetime | None = None
    resource: Mapping[str, Any] = field(default_factory=dict)
    scope: str | None = None
    #: a run of a span hoptrace did not make, matched to its step by its service and messaging
    #: facts (``spanfacts.step_runs`` fills ``step`` and ``outcome`` in); never stored
    matched: bool = False

    def attr(self, *keys: str) -> Any:
        """The first of ``keys`` the span carries with a non-empty value, else None."""
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
    """A dead-lettered record of the correlation, with the reason its header gives."""

    topic: str
    partition: int
    offset: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A live member of a consumer group, with the partitions of one topic it is assigned
    (DescribeGroups, its assignment decoded)."""

    group: str
    client_id: str
    host: str
    partitions: tuple[int, ...]

    def __str__(self) -> str:
        parts = ",".join(map(str, self.partitions))
        return f"{self.client_id} at {self.host.lstrip('/')} (partitions {parts})"


@dataclass(frozen=True, slots=True)
class KafkaFacts:
    """What Kafka says about one step's consumed topic and group (``None`` = not known)."""

    topic: str | None
    group: str | None = None
    topic_exists: bool | None = None
    group_exists: bool | None = None
    group_state: str | None = None
    group_members: int | None = None
    #: the record this correlation produced into ``topic`` (from the emitting step's span)
    record: RecordRef | None = None
    committed_offset: int | None = None
    end_offset: int | None = None
    #: other groups consuming ``topic`` (a worker running under a wrong group): with live
    #: members assigned its partitions, or with committed offsets on it
    other_groups: tuple[str, ...] | None = None
    #: the live members of ``other_groups`` assigned ``topic`` (None: not looked up)
    other_members: tuple[GroupMember, ...] | None = None
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
    """One processed mark (idempotency row) of the correlation. ``table``: the processed table it
    was read from (the spec's ``processed``; None when built by hand: the pipeline's)."""

    event_id: str | None
    event_type: str | None
    source: str | None
    processed_at: datetime | None = None
    table: str | None = None


@dataclass(frozen=True, slots=True)
class RedriveRecord:
    """One audited ``hoptrace redrive`` action on the correlation (its ``redrives`` row): who,
    when, at which step, what it did (``action``, the record ``sent``, from ``source``) and how it
    ended (``result``), with the new attempt's trace."""

    id: int
    step: str
    cause: str
    action: str
    result: str
    who: str
    at: datetime
    source: str | None = None
    sent: str | None = None
    detail: str | None = None
    trace_id: str | None = None

    def line(self) -> str:
        """One evidence line (``redrive #3 by alice at ...: ...``)."""
        what = f"{self.action} ({self.cause})"
        if self.sent:
            what += f" -> {self.sent}"
        if self.source:
            what += f" from {self.source}"
        tail = f"; {self.detail}" if self.detail else ""
        trace = f" (trace {self.trace_id[:16]})" if self.trace_id else ""
        when = self.at.isoformat(timespec="milliseconds")
        return f"redrive #{self.id} by {self.who} at {when}: {what}: {self.result}{tail}{trace}"


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
    #: the correlation's audited redrives, oldest first (``hoptrace redrive``)
    redrives: tuple[RedriveRecord, ...] = ()


__all__ = [
    "SOURCE_DATABASE",
    "SOURCE_DEAD_LETTERS",
    "SOURCE_KAFKA",
    "SOURCE_OTHER_GROUPS",
    "SOURCE_SPANS",
    "DlqRecord",
    "Evidence",
    "GroupMember",
    "KafkaFacts",
    "ProcessedEvent",
    "RecordRef",
    "RedriveRecord",
    "SpanRecord",
]

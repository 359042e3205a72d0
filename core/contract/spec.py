"""The pipeline spec model: a pipeline's steps, topics, groups, tables and deadlines, as typed
objects (``spec_loader`` reads them from a TOML file and validates them). Everything the
collector and the dashboard know about a pipeline comes from here, never from names in code.

Steps form a DAG: each names the steps it runs after (``after``, default: the previous step), so
one topic may be consumed by several groups (fan-out). The file lists steps in an order where
every step comes after the steps it names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from .conventions import BAGGAGE_KEY, dlq_topic

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: The effect table's correlation column when the spec names none.
DEFAULT_CORRELATION_COLUMN = "correlation_id"


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names file, step and field."""


def parse_duration(text: str) -> timedelta:
    """``"30s"``, ``"500ms"``, ``"5m"``, ``"2h"``, ``"7d"`` -> timedelta (positive)."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"bad duration {text!r}: expected a number and a unit (ms, s, m, h, d)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: must be greater than zero")
    return timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class ProcessedTable:
    """Where a pipeline's services record processed events (their idempotency marks): hoptrace's
    own ``processed_events`` by default, or a table of the user's schema."""

    table: str = "processed_events"
    event_id_column: str | None = "event_id"
    event_type_column: str | None = "event_type"
    correlation_column: str = "correlation_id"
    source_column: str | None = "source"
    processed_at_column: str | None = "processed_at"


@dataclass(frozen=True, slots=True)
class OutboxTable:
    """Where a producer keeps the events it emits (a transactional outbox): one row per
    correlation holding the emitted event. ``hoptrace redrive`` re-emits a step's event from
    here when it was never emitted (``not_emitted``) or has left its topic."""

    table: str
    correlation_column: str = "correlation_id"
    #: the column holding the event as it is sent (bytes, text or JSON)
    event_column: str = "event"


@dataclass(frozen=True, slots=True)
class CorrelationCarriers:
    """Where spans carry the correlation id, in order of preference: the baggage attribute
    (``hoptrace.correlation_id``, copied from W3C baggage by a baggage span processor), named
    span attributes, the Kafka message key. A span with none inherits the id of its trace."""

    baggage: bool = True
    attributes: tuple[str, ...] = ()
    message_key: bool = False

    @property
    def attribute_keys(self) -> tuple[str, ...]:
        """Span attribute names to read, in order (the message key comes separately)."""
        return ((BAGGAGE_KEY,) if self.baggage else ()) + self.attributes


@dataclass(frozen=True, slots=True)
class Step:
    id: str
    service: str
    deadline: timedelta
    consumes: str | None = None
    group: str | None = None
    emits: str | None = None
    table: str | None = None
    #: the effect table's column holding the correlation id
    correlation_column: str = DEFAULT_CORRELATION_COLUMN
    #: the type of the event this step consumes (as its processed marks record it)
    event_type: str | None = None
    #: the downstream service this step calls (its failures are ``downstream_error``)
    calls: str | None = None
    #: the steps this one runs after (empty: a first step)
    after: tuple[str, ...] = ()
    #: where this step's processed marks are (None: the pipeline's)
    processed: ProcessedTable | None = None
    #: where this step keeps the events it emits (None: hoptrace's ledger for a consuming
    #: step, nowhere for a first step)
    outbox: OutboxTable | None = None

    @property
    def dlq(self) -> str | None:
        """Dead-letter topic for records this step could not process."""
        return dlq_topic(self.consumes) if self.consumes else None


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    correlation_key: str
    steps: tuple[Step, ...]
    partitions: int = 3
    replication_factor: int = 1
    source: Path | None = field(default=None, compare=False)
    correlation: CorrelationCarriers = field(default_factory=CorrelationCarriers)
    processed: ProcessedTable = field(default_factory=ProcessedTable)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __hash__(self) -> int:
        return hash((self.name, self.steps))

    @cached_property
    def _by_id(self) -> dict[str, int]:
        return {s.id: i for i, s in enumerate(self.steps)}

    def step(self, step_id: str) -> Step:
        i = self._by_id.get(step_id)
        if i is None:
            raise KeyError(f"pipeline {self.name!r} has no step {step_id!r}")
        return self.steps[i]

    def index(self, step_id: str) -> int:
        i = self._by_id.get(step_id)
        if i is None:
            raise KeyError(f"pipeline {self.name!r} has no step {step_id!r}")
        return i

    def has_step(self, step_id: str) -> bool:
        return step_id in self._by_id

    def next_step(self, step_id: str) -> Step | None:
        """The step listed after ``step_id`` (in a linear pipeline: the one that runs next)."""
        i = self.index(step_id)
        return self.steps[i + 1] if i + 1 < len(self.steps) else None

    def parents(self, step_id: str) -> tuple[Step, ...]:
        """The steps ``step_id`` runs after."""
        return tuple(self.step(p) for p in self.step(step_id).after)

    def children(self, step_id: str) -> tuple[Step, ...]:
        """The steps that run after ``step_id``."""
        return self._children.get(step_id, ())

    @cached_property
    def _children(self) -> dict[str, tuple[Step, ...]]:
        out: dict[str, tuple[Step, ...]] = {}
        for step in self.steps:
            for parent in step.after:
                out[parent] = (*out.get(parent, ()), step)
        return out

    @cached_property
    def roots(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if not s.after)

    @cached_property
    def leaves(self) -> tuple[Step, ...]:
        """Steps nothing runs after: a correlation is complete when all of them are done."""
        parents = {p for s in self.steps for p in s.after}
        return tuple(s for s in self.steps if s.id not in parents)

    @cached_property
    def is_linear(self) -> bool:
        """Each step runs after the one listed before it (no fan-out, no join)."""
        return all(
            s.after == ((self.steps[i - 1].id,) if i else ()) for i, s in enumerate(self.steps)
        )

    def emitter(self, step_id: str) -> Step | None:
        """The step whose emitted record ``step_id`` consumes: the closest ancestor emitting its
        topic (None for a step that consumes nothing)."""
        step = self.step(step_id)
        if not step.consumes:
            return None
        todo, seen = list(step.after), set()
        while todo:  # breadth first over ancestors
            sid = todo.pop(0)
            if sid in seen:
                continue
            seen.add(sid)
            anc = self.step(sid)
            if anc.emits == step.consumes:
                return anc
            todo.extend(anc.after)
        for earlier in reversed(self.steps[: self.index(step_id)]):
            if earlier.emits == step.consumes:
                return earlier
        return None

    def consumers_of(self, topic: str) -> tuple[Step, ...]:
        """Steps consuming ``topic`` (several under different groups: fan-out)."""
        return tuple(s for s in self.steps if s.consumes == topic)

    def step_for_service(self, service: str) -> Step:
        for step in self.steps:
            if step.service == service:
                return step
        raise KeyError(f"pipeline {self.name!r} has no step run by service {service!r}")

    def processed_for(self, step: Step) -> ProcessedTable:
        return step.processed or self.processed

    @property
    def topics(self) -> list[str]:
        """Every topic the pipeline needs: emitted topics and their dead-letter topics."""
        out: list[str] = []
        for step in self.steps:
            for topic in (step.emits, step.consumes, step.dlq):
                if topic and topic not in out:
                    out.append(topic)
        return out

    @property
    def services(self) -> list[str]:
        return [s.service for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (the read API's ``/pipeline``)."""
        return {
            "name": self.name,
            "correlation_key": self.correlation_key,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "correlation": {
                "baggage": self.correlation.baggage,
                "attributes": list(self.correlation.attributes),
                "message_key": self.correlation.message_key,
            },
            "processed": _processed_dict(self.processed),
            "steps": [
                {
                    "id": s.id,
                    "service": s.service,
                    "consumes": s.consumes,
                    "group": s.group,
                    "emits": s.emits,
                    "table": s.table,
                    "correlation_column": s.correlation_column,
                    "event_type": s.event_type,
                    "calls": s.calls,
                    "after": list(s.after),
                    "deadline_s": s.deadline.total_seconds(),
                    "dlq": s.dlq,
                    "processed": _processed_dict(s.processed) if s.processed else None,
                    "outbox": _outbox_dict(s.outbox) if s.outbox else None,
                }
                for s in self.steps
            ],
        }


def _processed_dict(p: ProcessedTable) -> dict[str, Any]:
    return {
        "table": p.table,
        "event_id_column": p.event_id_column,
        "event_type_column": p.event_type_column,
        "correlation_column": p.correlation_column,
        "source_column": p.source_column,
        "processed_at_column": p.processed_at_column,
    }


def _outbox_dict(o: OutboxTable) -> dict[str, Any]:
    return {
        "table": o.table,
        "correlation_column": o.correlation_column,
        "event_column": o.event_column,
    }

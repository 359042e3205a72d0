"""The pipeline spec: a TOML file naming a pipeline's steps, topics, groups, tables and deadlines,
loaded into typed, validated objects. Everything the collector and the dashboard know about a
pipeline comes from here, never from names in code.

Errors name the file, the step and the field, e.g.::

    pipelines/payments.toml: step 'purchase.created': field 'consumes': topic 'purchase-confirmd'
    is not emitted by any earlier step

Steps form a DAG: each names the steps it runs after (``after``, default: the previous step), so
one topic may be consumed by several groups (fan-out). The file lists steps in an order where
every step comes after the steps it names.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from .conventions import BAGGAGE_KEY, dlq_topic

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_STEP_KEYS = {
    "id",
    "service",
    "consumes",
    "group",
    "emits",
    "table",
    "deadline",
    "correlation_column",
    "event_type",
    "calls",
    "after",
    "processed",
}
_PIPELINE_KEYS = {
    "name",
    "correlation_key",
    "partitions",
    "replication_factor",
    "correlation",
    "processed",
}
_CORRELATION_KEYS = {"baggage", "attribute", "attributes", "message_key"}
_PROCESSED_KEYS = {
    "table",
    "event_id_column",
    "event_type_column",
    "correlation_column",
    "source_column",
    "processed_at_column",
}
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


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: pipeline spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a pipeline spec file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(raw, source=path)


class _Fail:
    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, msg: str, step: str | None = None, fld: str | None = None) -> SpecError:
        parts = [self.where]
        if step is not None:
            parts.append(f"step {step!r}")
        if fld is not None:
            parts.append(f"field {fld!r}")
        return SpecError(": ".join(parts) + ": " + msg)


def _ident(value: Any, fail: _Fail, fld: str, step: str | None = None) -> str:
    """A table or column name (optionally schema-qualified)."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise fail(f"{value!r} is not a table or column name", step=step, fld=fld)
    return value


def _processed(raw: Any, fail: _Fail, fld: str, step: str | None = None) -> ProcessedTable:
    if not isinstance(raw, dict):
        raise fail('must be a table (e.g. { table = "processed_events" })', step, fld)
    unknown = set(raw) - _PROCESSED_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}", step, fld)
    if "table" not in raw:
        raise fail("needs a 'table'", step, fld)
    values: dict[str, Any] = {"table": _ident(raw["table"], fail, f"{fld}.table", step)}
    for key in _PROCESSED_KEYS - {"table"}:
        if key in raw:
            value = raw[key]
            if value == "" and key != "correlation_column":
                values[key] = None  # the user's table has no such column
            else:
                values[key] = _ident(value, fail, f"{fld}.{key}", step)
    return ProcessedTable(**values)


def _carriers(raw: Any, fail: _Fail) -> CorrelationCarriers:
    if not isinstance(raw, dict):
        raise fail("[pipeline.correlation] must be a table", fld="correlation")
    unknown = set(raw) - _CORRELATION_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}", fld="correlation")
    baggage = raw.get("baggage", True)
    message_key = raw.get("message_key", False)
    for name, value in (("baggage", baggage), ("message_key", message_key)):
        if not isinstance(value, bool):
            raise fail("must be true or false", fld=f"correlation.{name}")
    attrs: list[str] = []
    for name in ("attribute", "attributes"):
        value = raw.get(name)
        values = [value] if isinstance(value, str) else value
        if value is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise fail("must be a span attribute name or a list of them", fld=f"correlation.{name}")
        attrs.extend(v for v in values if v not in attrs)
    if not baggage and not attrs and not message_key:
        raise fail("names no carrier: set baggage, attribute or message_key", fld="correlation")
    return CorrelationCarriers(baggage=baggage, attributes=tuple(attrs), message_key=message_key)


def parse_spec(raw: dict[str, Any], source: Path | None = None) -> PipelineSpec:
    fail = _Fail(str(source) if source else "<spec>")

    head = raw.get("pipeline")
    if not isinstance(head, dict):
        raise fail("missing [pipeline] table")
    unknown_head = set(head) - _PIPELINE_KEYS
    if unknown_head:
        raise fail(f"[pipeline] has unknown key(s) {sorted(unknown_head)}")
    name = head.get("name")
    if not isinstance(name, str) or not name:
        raise fail("[pipeline] needs a non-empty string", fld="name")
    key = head.get("correlation_key", "correlation_id")
    if not isinstance(key, str) or not key:
        raise fail("must be a non-empty string", fld="correlation_key")
    partitions = head.get("partitions", 3)
    replication = head.get("replication_factor", 1)
    for fname, value in (("partitions", partitions), ("replication_factor", replication)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail("must be a positive integer", fld=fname)
    carriers = _carriers(head["correlation"], fail) if "correlation" in head else None
    processed = _processed(head["processed"], fail, "processed") if "processed" in head else None

    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise fail("needs at least one [[steps]] entry", fld="steps")

    steps: list[Step] = []
    seen: dict[str, Step] = {}
    for n, item in enumerate(raw_steps):
        step = _step(n, item, seen, steps, fail)
        seen[step.id] = step
        steps.append(step)

    return PipelineSpec(
        name=name,
        correlation_key=key,
        steps=tuple(steps),
        partitions=partitions,
        replication_factor=replication,
        source=source,
        correlation=carriers or CorrelationCarriers(),
        processed=processed or ProcessedTable(),
    )


def _step(n: int, item: Any, seen: dict[str, Step], earlier: list[Step], fail: _Fail) -> Step:
    if not isinstance(item, dict):
        raise fail(f"steps[{n}] must be a table")
    sid = item.get("id")
    if not isinstance(sid, str) or not sid:
        raise fail(f"steps[{n}] needs a non-empty string", fld="id")
    unknown = set(item) - _STEP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}", step=sid)
    if sid in seen:
        raise fail("duplicate step id", step=sid, fld="id")
    service = item.get("service")
    if not isinstance(service, str) or not service:
        raise fail("needs a non-empty string", step=sid, fld="service")
    if "deadline" not in item:
        raise fail('missing (e.g. deadline = "30s")', step=sid, fld="deadline")
    try:
        deadline = parse_duration(item["deadline"])
    except ValueError as exc:
        raise fail(str(exc), step=sid, fld="deadline") from None
    values: dict[str, str | None] = {}
    for fname in ("consumes", "group", "emits", "table", "event_type", "calls"):
        value = item.get(fname)
        if value is not None and (not isinstance(value, str) or not value):
            raise fail("must be a non-empty string", step=sid, fld=fname)
        values[fname] = value
    for fname in ("consumes", "emits"):
        topic = values[fname]
        if topic is not None and not _TOPIC.match(topic):
            raise fail(f"{topic!r} is not a valid Kafka topic name", step=sid, fld=fname)
    if values["table"] is not None:
        _ident(values["table"], fail, "table", sid)
    column = item.get("correlation_column", DEFAULT_CORRELATION_COLUMN)
    column = _ident(column, fail, "correlation_column", sid)
    if values["consumes"] and not values["group"]:
        raise fail("a step that consumes needs a consumer group", step=sid, fld="group")
    if values["group"] and not values["consumes"]:
        raise fail("a group without a consumed topic", step=sid, fld="group")
    emitted = {s.emits for s in earlier if s.emits}
    if values["consumes"] and values["consumes"] not in emitted:
        raise fail(
            f"topic {values['consumes']!r} is not emitted by any earlier step",
            step=sid,
            fld="consumes",
        )
    if earlier and not values["consumes"]:
        raise fail("every step after the first must consume a topic", step=sid, fld="consumes")
    for other in earlier:
        if (
            values["consumes"]
            and other.consumes == values["consumes"]
            and other.group == values["group"]
        ):
            raise fail(
                f"step {other.id!r} already consumes {values['consumes']!r} as group "
                f"{values['group']!r}: two steps on one topic need two groups",
                step=sid,
                fld="group",
            )
    after = _after(item, sid, earlier, fail)
    processed = (
        _processed(item["processed"], fail, "processed", sid) if "processed" in item else None
    )
    return Step(
        id=sid,
        service=service,
        deadline=deadline,
        correlation_column=column,
        after=after,
        processed=processed,
        **values,
    )


def _after(item: dict[str, Any], sid: str, earlier: list[Step], fail: _Fail) -> tuple[str, ...]:
    if "after" not in item:
        return (earlier[-1].id,) if earlier else ()
    raw = item["after"]
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise fail("must be a list of step ids", step=sid, fld="after")
    known = {s.id for s in earlier}
    for parent in values:
        if parent == sid:
            raise fail("a step cannot run after itself", step=sid, fld="after")
        if parent not in known:
            raise fail(f"{parent!r} is not a step listed before this one", step=sid, fld="after")
    if earlier and not values:
        raise fail("only the first step may run after nothing", step=sid, fld="after")
    return tuple(dict.fromkeys(values))

"""Reading a pipeline spec: a TOML file into the typed, validated objects of ``spec``.

Errors name the file, the step and the field, e.g.::

    pipelines/payments.toml: step 'purchase.created': field 'consumes': topic 'purchase-confirmd'
    is not emitted by any earlier step
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from .spec import (
    DEFAULT_CORRELATION_COLUMN,
    CorrelationCarriers,
    OutboxTable,
    PipelineSpec,
    ProcessedTable,
    SpecError,
    Step,
    parse_duration,
)

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
    "outbox",
}
_PIPELINE_KEYS = {
    "name",
    "correlation_key",
    "partitions",
    "replication_factor",
    "correlation",
    "processed",
}
_OUTBOX_KEYS = {"table", "correlation_column", "event_column"}
_CORRELATION_KEYS = {"baggage", "attribute", "attributes", "message_key"}
_PROCESSED_KEYS = {
    "table",
    "event_id_column",
    "event_type_column",
    "correlation_column",
    "source_column",
    "processed_at_column",
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


def _outbox(raw: Any, fail: _Fail, step: str) -> OutboxTable:
    if not isinstance(raw, dict):
        raise fail('must be a table (e.g. { table = "outbox" })', step, "outbox")
    unknown = set(raw) - _OUTBOX_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}", step, "outbox")
    if "table" not in raw:
        raise fail("needs a 'table'", step, "outbox")
    values = {key: _ident(raw[key], fail, f"outbox.{key}", step) for key in _OUTBOX_KEYS & set(raw)}
    return OutboxTable(**values)


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
    outbox = _outbox(item["outbox"], fail, sid) if "outbox" in item else None
    if outbox is not None and not values["emits"]:
        raise fail("an outbox holds emitted events: the step needs 'emits'", sid, "outbox")
    return Step(
        id=sid,
        service=service,
        deadline=deadline,
        correlation_column=column,
        after=after,
        processed=processed,
        outbox=outbox,
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

"""Pipeline spec loader: a TOML file (DESIGN.md's contract) into typed, validated objects.

Errors name the file, the step and the field, e.g.::

    pipelines/payments.toml: step 'purchase.created': field 'consumes': topic 'purchase-confirmd'
    is not emitted by any earlier step
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_STEP_KEYS = {"id", "service", "consumes", "group", "emits", "table", "deadline"}


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
class Step:
    id: str
    service: str
    deadline: timedelta
    consumes: str | None = None
    group: str | None = None
    emits: str | None = None
    table: str | None = None

    @property
    def dlq(self) -> str | None:
        """Dead-letter topic for records this step could not process."""
        return f"{self.consumes}.dlq" if self.consumes else None


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    name: str
    correlation_key: str
    steps: tuple[Step, ...]
    partitions: int = 3
    replication_factor: int = 1
    source: Path | None = field(default=None, compare=False)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(f"pipeline {self.name!r} has no step {step_id!r}")

    def index(self, step_id: str) -> int:
        for i, step in enumerate(self.steps):
            if step.id == step_id:
                return i
        raise KeyError(f"pipeline {self.name!r} has no step {step_id!r}")

    def next_step(self, step_id: str) -> Step | None:
        i = self.index(step_id)
        return self.steps[i + 1] if i + 1 < len(self.steps) else None

    def step_for_service(self, service: str) -> Step:
        for step in self.steps:
            if step.service == service:
                return step
        raise KeyError(f"pipeline {self.name!r} has no step run by service {service!r}")

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


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: pipeline spec file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(raw, source=path)


def parse_spec(raw: dict, source: Path | None = None) -> PipelineSpec:
    where = str(source) if source else "<spec>"

    def fail(msg: str, step: str | None = None, fld: str | None = None) -> SpecError:
        parts = [where]
        if step is not None:
            parts.append(f"step {step!r}")
        if fld is not None:
            parts.append(f"field {fld!r}")
        return SpecError(": ".join(parts) + ": " + msg)

    head = raw.get("pipeline")
    if not isinstance(head, dict):
        raise fail("missing [pipeline] table")
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

    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise fail("needs at least one [[steps]] entry", fld="steps")

    steps: list[Step] = []
    seen: set[str] = set()
    emitted: set[str] = set()
    for n, item in enumerate(raw_steps):
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
        seen.add(sid)
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
        for fname in ("consumes", "group", "emits", "table"):
            value = item.get(fname)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail("must be a non-empty string", step=sid, fld=fname)
            values[fname] = value
        for fname in ("consumes", "emits"):
            topic = values[fname]
            if topic is not None and not _TOPIC.match(topic):
                raise fail(f"{topic!r} is not a valid Kafka topic name", step=sid, fld=fname)
        if values["consumes"] and not values["group"]:
            raise fail("a step that consumes needs a consumer group", step=sid, fld="group")
        if values["group"] and not values["consumes"]:
            raise fail("a group without a consumed topic", step=sid, fld="group")
        if values["consumes"] and values["consumes"] not in emitted:
            raise fail(
                f"topic {values['consumes']!r} is not emitted by any earlier step",
                step=sid,
                fld="consumes",
            )
        if n > 0 and not values["consumes"]:
            raise fail("every step after the first must consume a topic", step=sid, fld="consumes")
        if values["emits"]:
            emitted.add(values["emits"])
        steps.append(Step(id=sid, service=service, deadline=deadline, **values))

    return PipelineSpec(
        name=name,
        correlation_key=key,
        steps=tuple(steps),
        partitions=partitions,
        replication_factor=replication,
        source=source,
    )

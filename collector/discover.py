"""Propose a pipeline spec from spans already stored (``hoptrace spec discover``): the pure core.

Spans in (:class:`~hoptrace.collector.records.SpanRecord` as the store returns them: the runs, and
the spans of their traces for the links between them), a :class:`Proposal` out, which
``discover_toml.render`` writes as TOML for the user to edit. Nothing here reads a database (the
read side is ``discover_cli``); which spans are runs, and what is below each, is
``discover_runs``.

* **a step** is each (service, consumed topic, group) of the consumer runs; hoptrace's own step
  spans are steps by their ``hoptrace.step`` (its id); a producer-only run's (service, topic) is a
  first step. Other ids come from the service (and the topic, when the service runs several
  steps): readable, unique, made of ``[a-z0-9._-]``.
* **its values**: ``emits`` the topic most of its runs produce to; ``table`` the table most of its
  runs write (ties: the first written), the runners-up named in a comment; ``event_type`` and
  ``calls`` likewise; a consumer group the spans do not name is a ``# group = "?"`` placeholder
  (the spec does not load until it is set).
* **the order**: each step runs after the step that emits its consumed topic (several steps on one
  topic under different groups: a fan-out); steps are listed depth first from the first step, so
  ``after`` is written only where the previous step listed is not the one. A topic consumed but
  produced by nobody seen gets a placeholder first step. Of the trees this makes, the one with
  the most steps seen is the spec; the others (another pipeline) are proposed commented out.
* **a deadline**: the observed p99 of (step done - previous step done) times :data:`MARGIN`,
  rounded up to a readable value, at least :data:`MIN_DEADLINE`; the previous step's run is the
  nearest run above in the trace, else the one with the same correlation id. A first step's is
  counted from the start of its request.
* **the correlation carriers**: the baggage attribute when runs carry it; the message key when
  consumer runs without it carry one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hoptrace.contract.conventions import (
    ATTR_CORRELATION_ID,
    ATTR_EVENT_TYPE,
    ATTR_PIPELINE,
    ATTR_STEP,
    RESOURCE_DISTRO_NAME,
)
from hoptrace.contract.matching import Messaging
from hoptrace.ids import is_valid_correlation_id

from .discover_runs import Run, SpanTree, failed, find_runs
from .records import SpanRecord

#: A deadline is the observed p99 times this, rounded up to a readable value ...
MARGIN = 3
#: ... and at least this.
MIN_DEADLINE = timedelta(seconds=1)
#: The deadline proposed for a step with no observed pair (a placeholder to set).
UNOBSERVED_DEADLINE = "30s"
#: Readable deadlines, in seconds (above the last: whole days).
_LADDER = (1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1200, 1800, 2700)
_LADDER += (3600, 7200, 10800, 21600, 43200, 86400)
_STEP_ID_CHARS = re.compile(r"[^a-z0-9._-]+")


# ----------------------------------------------------------------------------------- the result


@dataclass
class ProposedStep:
    """One step of the proposal; ``notes`` maps a field to the comment written beside it."""

    id: str
    service: str
    consumes: str | None = None
    group: str | None = None
    emits: str | None = None
    table: str | None = None
    event_type: str | None = None
    calls: str | None = None
    deadline: str = UNOBSERVED_DEADLINE
    after: tuple[str, ...] = ()
    #: written commented out: not reachable from the first step
    enabled: bool = True
    notes: dict[str, str] = field(default_factory=dict)
    title: str = ""


@dataclass
class Proposal:
    name: str
    steps: list[ProposedStep]
    #: the correlation carriers (``[pipeline.correlation]``: ``CorrelationCarriers``' fields),
    #: each with what it was seen from in ``<field>_note``
    baggage: bool = True
    baggage_note: str | None = None
    message_key: bool = False
    message_key_note: str | None = None
    notes: dict[str, str] = field(default_factory=dict)
    #: what the user should know (the CLI prints them on stderr)
    remarks: list[str] = field(default_factory=list)


def span_of(row: Mapping[str, Any]) -> SpanRecord:
    """A stored span row (the ``spans`` columns; ``attributes``/``resource`` as JSON text or
    mappings; ``distro``: the resource's ``telemetry.distro.name`` alone) as a SpanRecord."""
    d = {k: row[k] for k in SpanRecord.__slots__ if k in row}  # type: ignore[attr-defined]
    for key in ("attributes", "resource"):
        value = d.get(key)
        d[key] = (json.loads(value) if isinstance(value, str) else value) or {}
    if row.get("distro") is not None:
        d["resource"] = {**d["resource"], RESOURCE_DISTRO_NAME: row["distro"]}
    return SpanRecord(**d)


@dataclass
class _Step:
    key: tuple[str | None, ...]
    runs: list[Run] = field(default_factory=list)
    id: str = ""
    parent: _Step | None = None
    samples: list[float] = field(default_factory=list)

    @property
    def own(self) -> bool:
        return self.key[0] == "own"

    @property
    def first_seen(self) -> datetime:
        return min(r.span.start_time for r in self.runs)

    def most(self, values: Iterable[str | None]) -> tuple[str | None, int]:
        counts = Counter(v for v in values if v)
        return counts.most_common(1)[0] if counts else (None, 0)

    @property
    def service(self) -> str:
        return self.most(r.span.service for r in self.runs)[0] or "?"

    @property
    def consumes(self) -> str | None:
        return self.most(r.consumes for r in self.runs)[0]

    @property
    def group(self) -> str | None:
        return self.most(r.group for r in self.runs)[0]

    @property
    def emits(self) -> tuple[str | None, int]:
        if self.key[0] == "source":  # a placeholder first step: the topic nobody was seen emit
            return self.key[1], 0
        return self.most(r.emits[0] if r.emits else None for r in self.runs)


# ----------------------------------------------------------------------------------- steps


def discover(spans: Iterable[SpanRecord], margin: int = MARGIN) -> Proposal | None:
    """Propose a spec from ``spans`` (None: no step run among them)."""
    found = find_runs(spans)
    index, runs, pipeline = found.tree, found.runs, found.pipeline
    if not runs:
        return None
    steps: dict[tuple[str | None, ...], _Step] = {}
    for run in sorted(runs.values(), key=lambda r: r.span.start_time):
        steps.setdefault(run.key, _Step(run.key)).runs.append(run)
    ordered = _order(list(steps.values()))
    _name(ordered)
    _pair(index, runs, steps, ordered)
    proposal = Proposal(pipeline or "discovered", [_propose(s, margin) for s in ordered])
    _after(proposal, ordered)
    _carriers(proposal, list(runs.values()))
    proposal.notes["name"] = (
        f"{ATTR_PIPELINE} on {found.named}/{found.named_all} step spans"
        if pipeline
        else "no span names a pipeline: name it"
    )
    for other, n in found.skipped.items():
        proposal.remarks.append(f"skipped {n} step spans of pipeline {other!r} (another pipeline)")
    return proposal


def _order(steps: list[_Step]) -> list[_Step]:
    """Each consuming step's parent (the step emitting its topic, else a placeholder first step
    for the topic); the steps depth first from the first step of the biggest tree (children by
    first seen); the other trees after it (written commented out)."""
    emitters: dict[str, list[_Step]] = defaultdict(list)
    for step in steps:
        topic = step.emits[0]
        if topic:
            emitters[topic].append(step)
    placeholders: dict[str, _Step] = {}
    for step in sorted(steps, key=_seen):
        if step.consumes:
            options = [e for e in emitters.get(step.consumes, []) if e is not step]
            step.parent = min(options, key=_seen) if options else None
            if step.parent is None:  # nobody seen producing its topic
                step.parent = placeholders.setdefault(
                    step.consumes, _Step(("source", step.consumes))
                )
    roots = [s for s in steps if not s.consumes] + list(placeholders.values())
    if not roots and steps:  # a cycle nobody was seen producing into: enter at the first
        first = min(steps, key=_seen)
        first.parent = _Step(("source", first.consumes))
        roots = [first.parent]
    children: dict[int, list[_Step]] = defaultdict(list)
    for step in steps:
        if step.parent is not None:
            children[id(step.parent)].append(step)

    def tree(root: _Step) -> list[_Step]:
        out: list[_Step] = []
        todo = [root]
        while todo:
            step = todo.pop()
            if step not in out:
                out.append(step)
                todo.extend(sorted(children[id(step)], key=_seen, reverse=True))
        return out

    def weight(t: list[_Step]) -> tuple[int, int, float]:
        seen = [s for s in t if s.runs]
        return (-len(seen), -sum(len(s.runs) for s in seen), min(map(_seen, seen), default=0))

    placed: list[_Step] = []
    for t in sorted((tree(r) for r in roots), key=weight):
        placed.extend(s for s in t if s not in placed)
    placed.extend(s for s in sorted(steps, key=_seen) if s not in placed)
    return placed


def _seen(step: _Step) -> float:
    return step.first_seen.timestamp() if step.runs else math.inf


def _name(steps: list[_Step]) -> None:
    """Step ids: hoptrace's own, else from the service (and the topic when the service runs
    several steps): readable, unique, made of ``[a-z0-9._-]``."""
    per_service = Counter(s.service for s in steps if s.runs)
    used: set[str] = set()
    for step in steps:
        if step.own:
            base = str(step.key[1])
        elif not step.runs:
            base = _slug(f"{step.key[1]}.producer")
        elif per_service[step.service] > 1:
            base = _slug(f"{step.service}.{step.consumes or step.emits[0]}")
        else:
            base = _slug(step.service)
        sid, n = base, 2
        while sid in used:
            sid, n = f"{base}-{n}", n + 1
        used.add(sid)
        step.id = sid


def _slug(text: str) -> str:
    return _STEP_ID_CHARS.sub("-", text.lower()).strip("-.") or "step"


def _cid(span: SpanRecord) -> str | None:
    for value in (
        span.correlation_id,
        span.attributes.get(ATTR_CORRELATION_ID),
        Messaging.of(span.attributes).key,
    ):
        if isinstance(value, str) and is_valid_correlation_id(value):
            return value
    return None


def _pair(
    spans: SpanTree,
    runs: Mapping[tuple[str, str], Run],
    steps: Mapping[tuple[str | None, ...], _Step],
    ordered: list[_Step],
) -> None:
    """Deadline samples: each successful run's done time after its previous step's."""
    done: dict[tuple[int, str], datetime] = {}
    for step in ordered:
        for run in step.runs:
            cid = _cid(run.span)
            if cid and run.span.end_time and not failed(run.span):
                key = (id(step), cid)
                done[key] = min(done.get(key, run.span.end_time), run.span.end_time)
    for step in ordered:
        for run in step.runs:
            end = run.span.end_time
            if end is None or failed(run.span):
                continue
            if step.parent is None:
                if run.started is not None:
                    step.samples.append((end - run.started).total_seconds())
                continue
            before = _above(spans, runs, run, steps, step.parent)
            cid = _cid(run.span)
            if before is None and cid is not None:
                before = done.get((id(step.parent), cid))
            if before is not None:
                step.samples.append(max(0.0, (end - before).total_seconds()))


def _above(
    spans: SpanTree,
    runs: Mapping[tuple[str, str], Run],
    run: Run,
    steps: Mapping[tuple[str | None, ...], _Step],
    parent: _Step,
) -> datetime | None:
    """The end of the nearest run above ``run`` in its trace, when it is a run of ``parent``."""
    up = spans.parent(run.span)
    for _ in range(256):
        if up is None:
            return None
        found = runs.get((up.trace_id, up.span_id))
        if found is not None:
            return up.end_time if steps.get(found.key) is parent else None
        up = spans.parent(up)
    return None


# ----------------------------------------------------------------------------------- proposal


def _propose(step: _Step, margin: int) -> ProposedStep:
    n = len(step.runs)
    out = ProposedStep(id=step.id, service=step.service)
    if not step.runs:
        out.title = f"nobody was seen producing {step.key[1]}: a placeholder first step"
        out.notes["service"] = "set the service that produces it"
        out.emits = str(step.key[1])
        out.notes["deadline"] = "not observed: set it"
        return out
    errors = sum(failed(r.span) for r in step.runs)
    out.title = (
        f"{step.service}: {n} run{'s' if n != 1 else ''} ({errors} failed), "
        f"first seen {step.first_seen.astimezone(UTC):%Y-%m-%d %H:%M:%SZ}"
    )
    out.notes["id"] = (
        f"its spans' {ATTR_STEP}"
        if step.own
        else "from the service: rename at will (the step's name in lookups and alerts)"
    )
    if step.consumes:
        out.consumes = step.consumes
        out.notes["consumes"] = f"{n} consumer span{'s' if n != 1 else ''}"
        group, seen = step.most(r.group for r in step.runs)
        if group:
            out.group = group
            out.notes["group"] = f"on {seen}/{n} runs"
        else:
            out.notes["group"] = (
                "not in its spans: set the consumer group (the spec does not load without it)"
            )
        event, seen = step.most(
            str(r.span.attributes.get(ATTR_EVENT_TYPE) or "") for r in step.runs
        )
        if event:
            out.event_type = event
            out.notes["event_type"] = f"{ATTR_EVENT_TYPE} on {seen}/{n} runs"
    calls, seen = step.most(c for r in step.runs for c in r.calls[:1])
    if calls:
        out.calls = calls
        out.notes["calls"] = f"a server span of it below {seen}/{n} runs"
    emits, seen = step.emits
    if emits:
        out.emits = emits
        out.notes["emits"] = f"{seen}/{n} runs produce to it"
    tables = Counter(t for r in step.runs for t in r.tables)
    if tables:
        rank = {t: min(r.tables.index(t) for r in step.runs if t in r.tables) for t in tables}
        ordered = sorted(tables, key=lambda t: (-tables[t], rank[t], t))
        out.table = ordered[0]
        others = ", ".join(f"{t} ({tables[t]})" for t in ordered[1:4])
        out.notes["table"] = f"written below {tables[out.table]}/{n} runs" + (
            f"; also written: {others}" if others else ""
        )
    else:
        out.notes["table"] = "no write seen below its runs: the effect table, if it has one"
    out.deadline, out.notes["deadline"] = _deadline(step, margin)
    return out


def _deadline(step: _Step, margin: int) -> tuple[str, str]:
    if not step.samples:
        return UNOBSERVED_DEADLINE, "not observed (no run with its previous step's): set it"
    values = sorted(step.samples)
    p99 = values[max(0, math.ceil(0.99 * len(values)) - 1)]
    wanted = max(p99 * margin, MIN_DEADLINE.total_seconds())
    since = f"after {step.parent.id}" if step.parent else "after its request started"
    note = f"p99 {_fmt(p99)} of {len(values)} runs (done {since}) x{margin}, rounded up"
    if p99 * margin < MIN_DEADLINE.total_seconds():
        note += f", at least {duration(MIN_DEADLINE.total_seconds())}"
    return duration(_readable(wanted)), note


def _readable(seconds: float) -> float:
    for step in _LADDER:
        if seconds <= step:
            return step
    return math.ceil(seconds / 86400) * 86400


def duration(seconds: float) -> str:
    """A deadline as a spec writes it (``90s``, ``5m``, ``2h``, ``1d``)."""
    s = int(seconds)
    if s % 86400 == 0:
        return f"{s // 86400}d"
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0 and s >= 120:
        return f"{s // 60}m"
    return f"{s}s"


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _after(proposal: Proposal, ordered: list[_Step]) -> None:
    """``after`` where the previous step listed is not the parent; steps not reached from the
    first step are written commented out."""
    root = ordered[0]
    listed: list[ProposedStep] = []
    for step, out in zip(ordered, proposal.steps, strict=True):
        chain, up = step, step.parent
        while up is not None and chain is not root:
            chain, up = up, up.parent
        reached = chain is root and (step is root or step.parent is not None)
        if not reached:
            out.enabled = False
            why = f"its topic {step.consumes} is emitted by no step reached from the first"
            if not step.consumes:
                why = "a second first step: a spec has one"
            out.title += f" -- commented out: {why}"
            proposal.remarks.append(f"step {out.id!r} is commented out: {why}")
            continue
        if step.parent is not None and (not listed or listed[-1].id != step.parent.id):
            out.after = (step.parent.id,)
        listed.append(out)
        if step.consumes and not out.group:
            proposal.remarks.append(
                f"step {out.id!r}: its spans do not name the consumer group of "
                f'{step.consumes}: set `group` (the placeholder `# group = "?"`)'
            )


def _carriers(proposal: Proposal, runs: list[Run]) -> None:
    def baggage(run: Run) -> bool:
        value = run.span.attributes.get(ATTR_CORRELATION_ID)
        return isinstance(value, str) and is_valid_correlation_id(value)

    with_baggage = sum(baggage(r) for r in runs)
    keyed = sum(
        1 for r in runs if r.consumes and not baggage(r) and Messaging.of(r.span.attributes).key
    )
    proposal.baggage = bool(with_baggage) or not keyed
    proposal.message_key = bool(keyed)
    proposal.baggage_note = f"{ATTR_CORRELATION_ID} on {with_baggage}/{len(runs)} runs"
    if keyed:
        proposal.message_key_note = f"the message key on {keyed} consumer runs without it"
    if not with_baggage and not keyed:
        proposal.remarks.append(
            "no run carries a correlation id (baggage attribute or message key): set "
            "[pipeline.correlation] (attribute = the span attribute that holds it)"
        )

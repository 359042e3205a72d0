"""Which stored spans are step runs, and what is below each (for ``hoptrace spec discover``).

Pure functions over :class:`~hoptrace.collector.records.SpanRecord`, indexed as a forest per
trace (:class:`SpanTree`):

* **a run** is a consumer (process) span on a topic, read in every spelling
  (``hoptrace.contract.matching.Messaging``), of a service hoptrace did not write; or one of
  hoptrace's own step spans (``hoptrace.step``: its other spans are never runs); or a producer span
  of a service hoptrace did not write that is below no run and sends a topic its service emits
  from no consumer run: a producer-only (first) step. A service's runs on a topic without a group
  (kafkajs names none) join its one grouped step on that topic.
* **a run's scope** is its span's subtree without the runs below it; a run that consumes nothing
  has its request's scope (the topmost span of its service above it), since a service usually
  writes its row and then emits in one request. In its scope: the topics it emits (a producer
  span, or ``hoptrace.emit.topic``), the tables written (:func:`written_tables`) and the services
  it calls (a server span of another service below a span of its own).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from hoptrace.contract import Outcome
from hoptrace.contract.conventions import (
    ATTR_OUTCOME,
    ATTR_PIPELINE,
    ATTR_STEP,
    DB_OPERATION_KEYS,
    DB_STATEMENT_KEYS,
    DB_SUMMARY,
    DB_SYSTEM_KEYS,
    DB_TABLE_KEYS,
    DLQ_SUFFIX,
    EMIT_TOPIC_KEYS,
    STATUS_ERROR,
    SpanKind,
)
from hoptrace.contract.matching import Messaging, first_attr, is_consume, is_produce, reports_itself

from .records import SpanRecord

#: Every span attribute read on a database span.
DB_KEYS = DB_TABLE_KEYS + DB_STATEMENT_KEYS + (DB_SUMMARY,) + DB_OPERATION_KEYS + DB_SYSTEM_KEYS

_WRITE_OPS = ("insert", "update", "upsert", "merge", "replace", "findandmodify", "findoneand")
_WRITE_OPS += ("bulkwrite",)
_IDENT = r'"?[A-Za-z_][\w$]*"?(?:\."?[A-Za-z_][\w$]*"?)?'
_SQL_WRITE = re.compile(
    rf"\b(?P<lead>\w+\s+)?(?:(?:INSERT|UPSERT|REPLACE|MERGE)\s+INTO|UPDATE(?:\s+ONLY)?)\s+"
    rf"(?P<table>{_IDENT})",
    re.IGNORECASE,
)
_NOT_A_WRITE = {"DO", "FOR", "KEY"}  # ON CONFLICT DO UPDATE, SELECT ... FOR [NO KEY] UPDATE
_SQL_STRING = re.compile(r"'(?:[^']|'')*'")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def kind_of(span: SpanRecord) -> int:
    """The span's OTLP kind number (stored as a number, or as a name in hand-made spans)."""
    if isinstance(span.kind, int):
        return span.kind
    text = str(span.kind or "").upper().removeprefix("SPAN_KIND_")
    return SpanKind[text].value if text in SpanKind.__members__ else 0


def failed(span: SpanRecord) -> bool:
    """A failed run: status ERROR, or hoptrace's outcome ``error``."""
    out = span.outcome or span.attributes.get(ATTR_OUTCOME)
    return span.status_code == STATUS_ERROR or out == Outcome.ERROR


def written_tables(span: SpanRecord) -> list[str]:
    """The tables a database client span wrote (INSERT/UPDATE/UPSERT/MERGE), in statement
    order; [] for a read, or a span that is not a database call."""
    attrs = span.attributes
    if kind_of(span) != SpanKind.CLIENT or not any(k in attrs for k in DB_KEYS):
        return []
    op = str(first_attr(attrs, DB_OPERATION_KEYS) or "")
    table = first_attr(attrs, DB_TABLE_KEYS)
    if table and op:
        return [str(table)] if op.lower().startswith(_WRITE_OPS) else []
    statement = first_attr(attrs, DB_STATEMENT_KEYS)
    if isinstance(statement, str):
        return _sql_targets(statement)
    summary = attrs.get(DB_SUMMARY)
    if isinstance(summary, str):  # "INSERT tutoring_sessions"
        words = summary.split()
        if len(words) >= 2 and words[0].lower().startswith(_WRITE_OPS):
            return [w for w in words[1:2] if _TABLE_NAME.match(w)]
    return []


def _sql_targets(statement: str) -> list[str]:
    text = _SQL_STRING.sub("''", statement)
    out: list[str] = []
    for m in _SQL_WRITE.finditer(text):
        lead = (m.group("lead") or "").strip().upper()
        name = m.group("table").replace('"', "")
        if lead in _NOT_A_WRITE or name.upper() == "SET" or not _TABLE_NAME.match(name):
            continue
        if name not in out:
            out.append(name)
    return out


@dataclass
class Run:
    """One step run: its span, its step's key, and what its scope shows."""

    span: SpanRecord
    key: tuple[str | None, ...]
    consumes: str | None = None
    group: str | None = None
    emits: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    started: datetime | None = None  # its request's start (a first step's deadline counts from)


def is_dlq(topic: str | None) -> bool:
    """A dead-letter topic (never a step's consumed or emitted topic)."""
    return bool(topic) and str(topic).endswith(DLQ_SUFFIX)


class SpanTree:
    """Spans indexed as a forest per trace (a span whose parent is missing is a root)."""

    def __init__(self, spans: Iterable[SpanRecord]) -> None:
        self.by_id: dict[tuple[str, str], SpanRecord] = {}
        for s in spans:
            self.by_id.setdefault((s.trace_id, s.span_id), s)
        self.children: dict[tuple[str, str], list[SpanRecord]] = defaultdict(list)
        for s in self.by_id.values():
            if s.parent_span_id:
                self.children[(s.trace_id, s.parent_span_id)].append(s)

    def parent(self, span: SpanRecord) -> SpanRecord | None:
        if not span.parent_span_id:
            return None
        return self.by_id.get((span.trace_id, span.parent_span_id))

    def scope(self, top: SpanRecord, runs: Mapping[tuple[str, str], Run]) -> list[SpanRecord]:
        """``top``'s subtree without the runs below it (and their subtrees), by start time."""
        out: list[SpanRecord] = []
        todo = [top]
        while todo:
            span = todo.pop()
            out.append(span)
            for child in self.children.get((span.trace_id, span.span_id), ()):
                if (child.trace_id, child.span_id) not in runs:
                    todo.append(child)
        out.sort(key=lambda s: s.start_time)
        return out

    def request(self, span: SpanRecord, runs: Mapping[tuple[str, str], Run]) -> SpanRecord:
        """The topmost span of ``span``'s service above it (below any other run)."""
        top = span
        while (up := self.parent(top)) is not None and up.service == span.service:
            if (up.trace_id, up.span_id) in runs:
                break
            top = up
        return top


def _classify(
    spans: SpanTree, pipeline: str | None
) -> tuple[dict[tuple[str, str], Run], list[SpanRecord], Counter[str]]:
    """Consumer runs and hoptrace's step runs; the producer spans of other services; the
    pipelines hoptrace's spans name."""
    runs: dict[tuple[str, str], Run] = {}
    producers: list[SpanRecord] = []
    skipped: Counter[str] = Counter()
    for s in spans.by_id.values():
        attrs, kind = s.attributes, kind_of(s)
        m = Messaging.of(attrs)
        sid = s.step or attrs.get(ATTR_STEP)
        if sid is not None or reports_itself(s.resource):
            outcome = s.outcome or attrs.get(ATTR_OUTCOME)
            if sid is None or (outcome is None and s.name != sid):
                continue  # hoptrace's other spans: never steps
            name = s.pipeline or attrs.get(ATTR_PIPELINE)
            if pipeline is not None and name is not None and name != pipeline:
                skipped[str(name)] += 1
                continue
            consumed = is_consume(kind, m.operation) and m.destination
            run = Run(s, ("own", str(sid)))
            run.consumes = m.destination if consumed else None
            run.group = m.group if consumed else None
            emit = first_attr(attrs, EMIT_TOPIC_KEYS)
            if not emit and not consumed and is_produce(kind, m.operation):
                emit = m.destination
            run.emits = [str(emit)] if emit and not is_dlq(emit) else []
            runs[(s.trace_id, s.span_id)] = run
        elif m.destination and not is_dlq(m.destination):
            if is_consume(kind, m.operation):
                run = Run(s, ("consume", s.service, m.destination, m.group))
                run.consumes, run.group = m.destination, m.group
                runs[(s.trace_id, s.span_id)] = run
            elif is_produce(kind, m.operation):
                producers.append(s)
    return runs, producers, skipped


def _merge_groupless(runs: Mapping[tuple[str, str], Run]) -> None:
    """A service's consumer runs on a topic without a group join its one grouped step there."""
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in runs.values():
        if r.key[0] == "consume" and r.group:
            groups[(r.span.service, str(r.consumes))].add(r.group)
    for r in runs.values():
        if r.key[0] == "consume" and not r.group:
            known = groups.get((r.span.service, str(r.consumes)), set())
            if len(known) == 1:
                r.group = next(iter(known))
                r.key = ("consume", r.span.service, r.consumes, r.group)


def _fill(run: Run, scope: list[SpanRecord]) -> None:
    """A run's emitted topics, written tables and called services, from its scope."""
    by_id = {s.span_id: s for s in scope}
    for s in scope:
        if s is not run.span and not reports_itself(s.resource):
            m = Messaging.of(s.attributes)
            if m.destination and not is_dlq(m.destination) and is_produce(kind_of(s), m.operation):
                if m.destination not in run.emits:
                    run.emits.append(m.destination)
        run.tables.extend(t for t in written_tables(s) if t not in run.tables)
        up = by_id.get(s.parent_span_id or "")
        if kind_of(s) == SpanKind.SERVER and up is not None and up.service != s.service:
            if s.service != run.span.service and s.service not in run.calls:
                run.calls.append(s.service)


def _producer_runs(
    spans: SpanTree, runs: dict[tuple[str, str], Run], producers: list[SpanRecord]
) -> None:
    """Producer spans below no run, of a service that does not emit that topic from a consumer
    step: runs of producer-only steps (the outermost of nested ones)."""
    scoped: set[tuple[str, str]] = set()
    for run in list(runs.values()):
        scope = spans.scope(run.span, runs)
        scoped.update((s.trace_id, s.span_id) for s in scope)
        _fill(run, scope)
    emitted = {(r.span.service, t) for r in runs.values() for t in r.emits}
    mine: dict[tuple[str, str], Run] = {}
    for s in producers:
        m = Messaging.of(s.attributes)
        if (s.trace_id, s.span_id) in scoped or (s.service, m.destination) in emitted:
            continue
        up = spans.parent(s)
        while up is not None and up.service == s.service:
            um = Messaging.of(up.attributes)
            if um.destination == m.destination and is_produce(kind_of(up), um.operation):
                break  # the outer one is the run
            up = spans.parent(up)
        if up is None or up.service != s.service:
            run = Run(s, ("produce", s.service, m.destination), emits=[str(m.destination)])
            mine[(s.trace_id, s.span_id)] = run
    runs.update(mine)
    for run in runs.values():
        if run.consumes is None:
            top = spans.request(run.span, runs)
            run.started = top.start_time
            if run.key[0] == "produce" or not run.tables:
                _fill(run, spans.scope(top, runs))


@dataclass
class Runs:
    """The runs found (by trace and span id), the pipeline hoptrace's step spans name most, how
    many name it, and the step spans of other pipelines left out (by pipeline)."""

    tree: SpanTree
    runs: dict[tuple[str, str], Run]
    pipeline: str | None
    named: int
    named_all: int
    skipped: Counter[str]


def find_runs(spans: Iterable[SpanRecord]) -> Runs:
    """Every run among ``spans`` with what its scope shows."""
    tree = SpanTree(spans)
    names: Counter[str] = Counter()
    for s in tree.by_id.values():
        name = s.pipeline or s.attributes.get(ATTR_PIPELINE)
        if name and (s.step or s.attributes.get(ATTR_STEP)):
            names[str(name)] += 1
    pipeline, named = names.most_common(1)[0] if names else (None, 0)
    runs, producers, skipped = _classify(tree, pipeline)
    _merge_groupless(runs)
    _producer_runs(tree, runs, producers)
    return Runs(tree, runs, pipeline, named, sum(names.values()), skipped)

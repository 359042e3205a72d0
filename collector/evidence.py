"""One lookup of one correlation id: gather the evidence (spans, Kafka and database facts, each
source read-only and bounded in time) once, and diagnose from it.

* ``lookup(cid, spec, sources) -> Diagnosis``: the evidence and the diagnosis computed from it
  (``Diagnosis.facts`` holds the evidence, for readers that show it);
* ``gather(cid, spec, sources) -> Evidence``: the evidence alone.

First pass, concurrently: the correlation's spans (those carrying its id and the other spans of
their traces), the database facts (``db_facts.py``) and the Kafka facts of every consuming step
(``kafka_facts.py``). Second pass, only for the steps where the correlation's branches stopped:
other groups on a step's topic (live members, committed offsets) when its group has no consumer,
and its dead-letter topic (``dlq_scan.py``) when a run was dead-lettered or the record was
consumed without a span. A source that does not answer in time is reported in
``Evidence.missing`` (never guessed).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from hoptrace.contract import PipelineSpec, Step
from hoptrace.contract.conventions import ATTR_DLQ_TOPIC, CORRELATION_HEADER

from . import store
from .db_facts import database_facts, effect_sql, processed_sql, processed_tables
from .diagnosis import Diagnosis, diagnose
from .dlq_scan import DLQ_SCAN_LIMIT, dlq_lookup
from .evidence_clients import DEFAULT_TIMEOUT, EvidenceSources, bounded
from .kafka_facts import OTHER_GROUPS_LIMIT, KafkaBase, kafka_base, kafka_facts, other_groups
from .records import (
    SOURCE_DATABASE,
    SOURCE_DEAD_LETTERS,
    SOURCE_KAFKA,
    SOURCE_OTHER_GROUPS,
    SOURCE_SPANS,
    Evidence,
    KafkaFacts,
    RedriveRecord,
    SpanRecord,
)
from .spanfacts import step_runs

SPANS_SQL = (
    "SELECT ... FROM spans WHERE correlation_id = $1, and the spans without a correlation id "
    "of their traces, ORDER BY start_time"
)


async def _spans(sources: EvidenceSources, cid: str) -> tuple[SpanRecord, ...]:
    pool = await sources.db()
    return tuple(await store.spans_for_correlation(pool, cid))


def _queries(spec: PipelineSpec) -> list[str]:
    """What the first pass asks, as the ``queries`` list shows it."""
    return [
        SPANS_SQL,
        *(processed_sql(p) for p in processed_tables(spec)),
        *(effect_sql(s.table, s.correlation_column) for s in spec.steps if s.table),
        "kafka: DescribeTopics " + ", ".join(s.consumes for s in spec.steps if s.consumes),
        "kafka: DescribeGroups + OffsetFetch " + ", ".join(s.group for s in spec.steps if s.group),
        "kafka: ListOffsets (end offsets) of the consumed topics",
    ]


async def _second_pass(
    cid: str,
    spec: PipelineSpec,
    sources: EvidenceSources,
    first: Diagnosis,
    ev: Evidence,
    base: KafkaBase | None,
    timeout: float,
    out: tuple[list[str], dict[str, str], dict[str, float]],
) -> dict[str, dict[str, Any]]:
    """Facts to add to the :class:`KafkaFacts` of the steps where branches stopped, by step id
    (empty: nothing more to read). The steps are looked at concurrently."""
    runs = step_runs(spec, ev.spans)
    heads = [spec.step(sid) for sid in first.stopped_at_all]
    found = await asyncio.gather(
        *(_more_facts(cid, stop, runs[stop.id], sources, ev, base, timeout, out) for stop in heads)
    )
    return {stop.id: extra for stop, extra in zip(heads, found, strict=True) if extra}


async def _more_facts(
    cid: str,
    stop: Step,
    step_runs_: list[SpanRecord],
    sources: EvidenceSources,
    ev: Evidence,
    base: KafkaBase | None,
    timeout: float,
    out: tuple[list[str], dict[str, str], dict[str, float]],
) -> dict[str, Any]:
    """Other groups on a stopped step's topic, its dead-lettered record."""
    queries, missing, timings = out
    kf = ev.kafka.get(stop.id)
    extra: dict[str, Any] = {}
    if kf is None or not kf.topic_exists:
        return extra
    if kf.group_exists is False or kf.group_members == 0:
        parts = (base.partitions.get(stop.consumes) or []) if base and stop.consumes else []
        queries.append(
            f"kafka: ListGroups + DescribeGroups + OffsetFetch on {stop.consumes} (other groups)"
        )
        others = await bounded(
            SOURCE_OTHER_GROUPS,
            lambda: other_groups(sources, stop, parts),
            timeout,
            missing,
            timings,
        )
        if others is not None:
            extra["other_groups"], extra["other_members"] = others
    # a dead-lettered run says so (hoptrace.dlq.topic); a record consumed without any span
    # may have been dead-lettered by an uninstrumented consumer
    lettered = [s for s in step_runs_ if s.attributes.get(ATTR_DLQ_TOPIC)]
    since = min((s.start_time for s in lettered), default=None)
    until = max((s.end_time or s.start_time for s in lettered), default=None)
    dlq = stop.dlq
    if dlq and (lettered or (not step_runs_ and kf.record_consumed)):
        where = f"from {since.isoformat()}" if since else f"the last {DLQ_SCAN_LIMIT} records"
        queries.append(f"kafka: scan {dlq} ({where}) for {CORRELATION_HEADER}")
        deadline = time.monotonic() + timeout
        extra["dlq"] = await bounded(
            SOURCE_DEAD_LETTERS,
            lambda: dlq_lookup(sources, dlq, cid, deadline, since, until),
            timeout,
            missing,
            timings,
        )
        extra["dlq_checked"] = SOURCE_DEAD_LETTERS not in missing
    return extra


async def lookup(
    cid: str,
    spec: PipelineSpec,
    sources: EvidenceSources,
    timeout: float | None = None,
    now: datetime | None = None,
) -> Diagnosis:
    """Gather the evidence for ``cid`` once (each source bounded by ``timeout`` seconds) and
    diagnose from it; ``Diagnosis.facts`` is that evidence."""
    timeout = timeout if timeout is not None else sources.timeout
    now = now or datetime.now(UTC)
    t0 = time.perf_counter()
    missing: dict[str, str] = {}
    timings: dict[str, float] = {}
    queries = _queries(spec)
    redrives: list[RedriveRecord] = []
    spans, db, base = await asyncio.gather(
        bounded(SOURCE_SPANS, lambda: _spans(sources, cid), timeout, missing, timings),
        bounded(
            SOURCE_DATABASE,
            lambda: database_facts(sources, spec, cid, missing, redrives),
            timeout,
            missing,
            timings,
        ),
        bounded(SOURCE_KAFKA, lambda: kafka_base(sources, spec), timeout, missing, timings),
    )
    spans = spans or ()
    processed, effects = db if db is not None else (None, {})
    facts: dict[str, KafkaFacts] = kafka_facts(spec, spans, base) if base is not None else {}
    ev = Evidence(
        correlation_id=cid,
        spans=spans,
        kafka=facts,
        processed=processed,
        effects=effects,
        missing=missing,
        queries=tuple(queries),
        redrives=tuple(redrives),
    )
    first = diagnose(spec, ev, now)
    extra = await _second_pass(
        cid, spec, sources, first, ev, base, timeout, (queries, missing, timings)
    )
    if extra:
        facts = {**facts, **{sid: replace(facts[sid], **more) for sid, more in extra.items()}}
    ev = replace(
        ev,
        kafka=facts,
        missing=dict(missing),
        queries=tuple(queries),
        gathered_in_ms=(time.perf_counter() - t0) * 1000,
        timings_ms=timings,
    )
    if extra:  # the stopped steps' facts grew: decide again on them
        return diagnose(spec, ev, now)
    return replace(first, facts=ev)


async def gather(
    cid: str,
    spec: PipelineSpec,
    sources: EvidenceSources,
    timeout: float | None = None,
    now: datetime | None = None,
) -> Evidence:
    """All evidence for ``cid``; each source bounded by ``timeout`` seconds."""
    facts = (await lookup(cid, spec, sources, timeout, now)).facts
    assert facts is not None
    return facts


__all__ = [
    "DEFAULT_TIMEOUT",
    "DLQ_SCAN_LIMIT",
    "OTHER_GROUPS_LIMIT",
    "EvidenceSources",
    "effect_sql",
    "gather",
    "lookup",
]

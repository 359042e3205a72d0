"""Evidence gathering for one correlation id: spans, Kafka and database facts, each source
read-only and bounded in time. A source that does not answer in time is reported in
``Evidence.missing`` (never guessed).

``EvidenceSources`` holds the long-lived clients (a Postgres pool, a Kafka admin client, a
group-less consumer for end offsets) so repeated lookups (dashboard, alerts, benchmark) pay no
connection set-up; ``gather(cid, spec, sources)`` does one lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.admin import ListGroupsRequest

from hoptrace.contract import PipelineSpec, Step
from hoptrace.settings import Settings, get_settings

from . import store
from .diagnosis import (
    DlqRecord,
    Evidence,
    KafkaFacts,
    ProcessedEvent,
    RecordRef,
    SpanRecord,
    diagnose,
    emitted_record,
)

T = TypeVar("T")

#: Seconds each source (spans, database, Kafka) may take before it counts as missing evidence.
DEFAULT_TIMEOUT = 3.0
#: Records read from the end of each dead-letter partition when looking for the correlation.
DLQ_SCAN_LIMIT = 2000
#: Other consumer groups examined when looking for a worker running under a wrong group.
OTHER_GROUPS_LIMIT = 200

CORRELATION_HEADER = "x-correlation-id"
DLQ_REASON_HEADER = "x-dlq-reason"

SPANS_SQL = "SELECT ... FROM spans WHERE correlation_id = $1 ORDER BY start_time"
PROCESSED_SQL = (
    "SELECT event_id, event_type, source, processed_at FROM processed_events "
    "WHERE correlation_id = $1 ORDER BY processed_at"
)


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def effect_sql(table: str) -> str:
    return f"SELECT EXISTS (SELECT 1 FROM {_quote(table)} WHERE correlation_id = $1)"  # noqa: S608


class EvidenceSources:
    """Long-lived, lazily started clients for evidence gathering. Use ``async with`` or
    ``start()``/``close()``; a client that fails to start is retried at the next lookup."""

    def __init__(
        self,
        settings: Settings | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.timeout = timeout
        self.pool: asyncpg.Pool | None = pool
        self._own_pool = pool is None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._scanner: AIOKafkaConsumer | None = None
        self.scan_lock = asyncio.Lock()
        self._coordinators: dict[str, int] = {}
        self._tables: dict[str, bool] = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> EvidenceSources:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def db(self) -> asyncpg.Pool:
        async with self._lock:
            if self.pool is None:
                self.pool = await asyncpg.create_pool(
                    self.settings.database_url, min_size=1, max_size=4, command_timeout=self.timeout
                )
        return self.pool

    async def kafka(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        async with self._lock:
            if self.admin is None:
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    request_timeout_ms=int(self.timeout * 1000),
                )
                try:
                    await admin.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await admin.close()
                    raise
                self.admin = admin
            if self.consumer is None:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=max(int(self.timeout * 1000), 1000),
                )
                try:
                    await consumer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise
                self.consumer = consumer
        return self.admin, self.consumer

    async def scanner(self) -> AIOKafkaConsumer:
        """A group-less consumer reserved for dead-letter scans (use under ``scan_lock``)."""
        async with self._lock:
            if self._scanner is None:
                scanner = AIOKafkaConsumer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    fetch_max_wait_ms=5,  # never hold a scan on a long poll at a partition's end
                )
                try:
                    await scanner.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await scanner.stop()
                    raise
                self._scanner = scanner
        return self._scanner

    async def coordinator(self, group: str) -> int:
        if group not in self._coordinators:
            admin, _ = await self.kafka()
            self._coordinators[group] = await admin.find_coordinator(group)
        return self._coordinators[group]

    async def table_exists(self, pool: asyncpg.Pool, table: str) -> bool:
        if not self._tables.get(table):
            self._tables[table] = bool(
                await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", _quote(table))
            )
        return self._tables[table]

    async def close(self) -> None:
        if self._scanner is not None:
            with contextlib.suppress(Exception):
                await self._scanner.stop()
            self._scanner = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            self.consumer = None
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close()
            self.admin = None
        if self.pool is not None and self._own_pool:
            with contextlib.suppress(Exception):
                await self.pool.close()
            self.pool = None


_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "hoptrace_evidence_timings", default=None
)


async def _bounded(
    name: str, make: Callable[[], Awaitable[T]], timeout: float, missing: dict[str, str]
) -> T | None:
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(make(), timeout)
    except TimeoutError:
        missing[name] = f"timed out after {timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure of a source is missing evidence
        missing[name] = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    finally:
        timings = _timings.get()
        if timings is not None:
            timings[name] = round((time.perf_counter() - t0) * 1000, 2)
    return None


# ------------------------------------------------------------------------------------ spans


def _plain(span: store.SpanRecord) -> SpanRecord:
    return SpanRecord(
        trace_id=span.trace_id,
        span_id=span.span_id,
        name=span.name,
        service=span.service,
        start_time=span.start_time,
        end_time=span.end_time,
        parent_span_id=span.parent_span_id,
        kind=span.kind,
        status_code=span.status_code,
        status_message=span.status_message,
        step=span.step,
        outcome=span.outcome,
        attributes=span.attributes or {},
        events=tuple(span.events or ()),
    )


async def _spans(sources: EvidenceSources, cid: str) -> tuple[SpanRecord, ...]:
    pool = await sources.db()
    return tuple(_plain(s) for s in await store.spans_for_correlation(pool, cid))


# ------------------------------------------------------------------------------------ database


async def _database(
    sources: EvidenceSources, spec: PipelineSpec, cid: str, missing: dict[str, str]
) -> tuple[tuple[ProcessedEvent, ...], dict[str, bool | None]]:
    """processed_events rows and one EXISTS per step table, in one round trip."""
    pool = await sources.db()
    has_processed = await sources.table_exists(pool, "processed_events")
    effects: dict[str, bool | None] = {}
    exprs: list[tuple[str, str]] = []
    for step in spec.steps:
        if not step.table:
            continue
        if await sources.table_exists(pool, step.table):
            exprs.append((step.id, step.table))
        else:
            effects[step.id] = None
            gone = f"table {step.table} not found"
            missing["database"] = (
                f"{missing['database']}; {gone}" if "database" in missing else gone
            )
    # identifiers come from the spec and are quoted; the id is a bind parameter
    cols = [f"{effect_sql(t).removeprefix('SELECT ')} AS e{i}" for i, (_, t) in enumerate(exprs)]
    if has_processed:
        cols.append(
            "(SELECT coalesce(json_agg(json_build_object('event_id', event_id, 'event_type', "
            "event_type, 'source', source, 'processed_at', processed_at) ORDER BY processed_at), "
            "'[]') FROM processed_events WHERE correlation_id = $1)::text AS processed"
        )
    processed: tuple[ProcessedEvent, ...] = ()
    if cols:
        row = await pool.fetchrow("SELECT " + ", ".join(cols), cid)  # noqa: S608
        for i, (sid, _) in enumerate(exprs):
            effects[sid] = bool(row[f"e{i}"])
        if has_processed:
            processed = tuple(
                ProcessedEvent(
                    p["event_id"],
                    p["event_type"],
                    p["source"],
                    datetime.fromisoformat(p["processed_at"]) if p["processed_at"] else None,
                )
                for p in json.loads(row["processed"])
            )
    return processed, effects


# ------------------------------------------------------------------------------------ kafka


async def _list_groups(admin: AIOKafkaAdminClient) -> list[str]:
    """Group ids on every known broker. ``AIOKafkaAdminClient.list_consumer_groups`` fetches the
    metadata of every topic first; the cached broker list is enough."""
    try:
        brokers = [b.nodeId for b in admin._client.cluster.brokers()]  # noqa: SLF001
    except AttributeError:
        brokers = []
    if not brokers:
        return [g[0] for g in await admin.list_consumer_groups()]
    out: list[str] = []
    for resp in await asyncio.gather(
        *(admin._send_request(ListGroupsRequest(), node) for node in brokers)  # noqa: SLF001
    ):
        if resp.error_code:
            raise for_code(resp.error_code)("listing consumer groups")
        out.extend(g[0] for g in resp.groups)
    return out


def _groups_described(responses: list[Any]) -> dict[str, tuple[str, int]]:
    """DescribeGroups responses -> {group: (state, members)} for groups that exist."""
    out: dict[str, tuple[str, int]] = {}
    for resp in responses:
        for g in getattr(resp, "groups", ()):
            error, gid, state, members = g[0], g[1], g[2], g[5]
            if error == 0 and gid and state != "Dead":
                out[gid] = (state, len(members))
    return out


async def _kafka_base(
    sources: EvidenceSources, spec: PipelineSpec
) -> tuple[
    dict[str, list[int] | None],
    dict[str, tuple[str, int]],
    dict[str, dict[int, int]],
    dict[TopicPartition, int],
]:
    """Topic partitions (None = topic missing), group (state, members), group committed offsets
    per consumed topic partition, end offsets of the consumed topics."""
    admin, consumer = await sources.kafka()
    consuming = [s for s in spec.steps if s.consumes and s.group]
    topics = list(dict.fromkeys(s.consumes for s in consuming if s.consumes))
    groups_listed = asyncio.ensure_future(_list_groups(admin))
    try:
        described = await admin.describe_topics(topics) if topics else []
    except BaseException:
        groups_listed.cancel()
        raise
    parts: dict[str, list[int] | None] = {t: None for t in topics}
    for t in described:
        if t.get("error_code") == 0:
            parts[t["topic"]] = sorted(p["partition"] for p in t.get("partitions", []))
    groups = [s.group for s in consuming if s.group]

    async def describe() -> dict[str, tuple[str, int]]:
        # DescribeGroups on a group the broker does not know, or on several groups at once,
        # returns bodies aiokafka 0.14 misreads with Kafka 4: list the groups first, then
        # describe each existing group in its own request (concurrently).
        known = set(await groups_listed)
        present = [g for g in groups if g in known]

        async def one(group: str) -> list[Any]:
            coord = await sources.coordinator(group)
            return await admin.describe_consumer_groups([group], group_coordinator_id=coord)

        out: dict[str, tuple[str, int]] = {}
        for responses in await asyncio.gather(*(one(g) for g in present)):
            out.update(_groups_described(responses))
        return out

    async def offsets(step: Step) -> tuple[str, dict[int, int]]:
        assert step.group and step.consumes
        tps = [TopicPartition(step.consumes, p) for p in parts.get(step.consumes) or []]
        if not tps:
            return step.id, {}
        coord = await sources.coordinator(step.group)
        got = await admin.list_consumer_group_offsets(
            step.group, group_coordinator_id=coord, partitions=tps
        )
        return step.id, {tp.partition: om.offset for tp, om in got.items() if om.offset >= 0}

    async def ends() -> dict[TopicPartition, int]:
        tps = [TopicPartition(t, p) for t, ps in parts.items() for p in ps or []]
        return dict(await consumer.end_offsets(tps)) if tps else {}

    state, ends_, *offs = await asyncio.gather(
        describe(), ends(), *(offsets(s) for s in consuming if parts.get(s.consumes))
    )
    return parts, state, dict(offs), ends_


def _kafka_facts(
    spec: PipelineSpec,
    spans: tuple[SpanRecord, ...],
    base: tuple[Any, Any, Any, Any],
) -> dict[str, KafkaFacts]:
    parts, groups, committed, ends = base
    out: dict[str, KafkaFacts] = {}
    ok_by_step: dict[str, list[SpanRecord]] = {}
    for span in spans:
        sid = span.step or span.attributes.get("hoptrace.step")
        if sid and (span.outcome or span.attributes.get("hoptrace.step.outcome")) in (
            "ok",
            "duplicate",
        ):
            ok_by_step.setdefault(str(sid), []).append(span)
    for i, step in enumerate(spec.steps):
        if not step.consumes:
            continue
        prev = spec.steps[i - 1] if i > 0 else None
        record: RecordRef | None = None
        if prev is not None:
            record = emitted_record(prev, ok_by_step.get(prev.id, []), spans)
        exists = parts.get(step.consumes) is not None
        group_state = groups.get(step.group)
        offs = committed.get(step.id, {})
        committed_at = end_at = None
        if record is not None and record.partition is not None:
            committed_at = offs.get(record.partition)
            end_at = ends.get(TopicPartition(step.consumes, record.partition))
        elif exists:
            end_at = sum(v for tp, v in ends.items() if tp.topic == step.consumes)
            committed_at = sum(offs.values()) if offs else None
        out[step.id] = KafkaFacts(
            topic=step.consumes,
            group=step.group,
            topic_exists=exists,
            group_exists=bool(group_state) or bool(offs),
            group_state=group_state[0] if group_state else None,
            group_members=group_state[1] if group_state else 0,
            record=record,
            committed_offset=committed_at,
            end_offset=end_at,
        )
    return out


async def _other_groups(
    sources: EvidenceSources, step: Step, partitions: list[int]
) -> tuple[str, ...]:
    """Groups other than the step's own with committed offsets on the step's topic."""
    admin, _ = await sources.kafka()
    assert step.consumes
    listed = [g for g in await _list_groups(admin) if g != step.group]
    # likeliest first: names derived from the expected group
    listed.sort(key=lambda g: (not (step.group and g.startswith(step.group)), g))
    tps = [TopicPartition(step.consumes, p) for p in partitions]
    sem = asyncio.Semaphore(16)

    async def one(group: str) -> str | None:
        async with sem:
            coord = await sources.coordinator(group)
            got = await admin.list_consumer_group_offsets(
                group, group_coordinator_id=coord, partitions=tps
            )
            return group if any(om.offset >= 0 for om in got.values()) else None

    found = await asyncio.gather(*(one(g) for g in listed[:OTHER_GROUPS_LIMIT]))
    return tuple(g for g in found if g)


async def _dlq_lookup(
    sources: EvidenceSources,
    dlq: str,
    cid: str,
    deadline: float,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DlqRecord | None:
    """Scan the tail of ``dlq`` for a record whose correlation header is ``cid``: the partition
    its key (the correlation id) hashes to first, then the others; at most ``DLQ_SCAN_LIMIT``
    records per partition, until ``deadline``."""
    admin, consumer = await sources.kafka()
    described = await admin.describe_topics([dlq])
    if not described or described[0].get("error_code") != 0:
        return None
    parts = sorted(p["partition"] for p in described[0]["partitions"])
    tps = [TopicPartition(dlq, p) for p in parts]
    ends = await consumer.end_offsets(tps)
    begins = await consumer.beginning_offsets(tps)
    todo = [tp for tp in tps if ends[tp] > begins[tp]]
    if not todo:
        return None
    starts = {tp: max(begins[tp], ends[tp] - DLQ_SCAN_LIMIT) for tp in todo}
    if since is not None:
        # dead-lettered when the failed run ended: start at that time, not at the tail
        at = int((since.timestamp() - 5) * 1000)
        found = await consumer.offsets_for_times({tp: at for tp in todo})
        for tp in todo:
            hit = found.get(tp)
            starts[tp] = hit.offset if hit is not None else ends[tp]
        todo = [tp for tp in todo if starts[tp] < ends[tp]]
    until_ms = int((until.timestamp() + 5) * 1000) if until is not None else None
    keyed = DefaultPartitioner()(cid.encode(), parts, parts)
    first = [tp for tp in todo if tp.partition == keyed]
    rest = [tp for tp in todo if tp.partition != keyed]
    scanner = await sources.scanner()
    async with sources.scan_lock:
        for group in (first, rest):  # records keyed by the correlation id sit in one partition
            if not group or time.monotonic() >= deadline:
                continue
            scanner.assign(group)
            for tp in group:
                scanner.seek(tp, starts[tp])
            left = set(group)
            while left and time.monotonic() < deadline:
                batch = await scanner.getmany(*left, timeout_ms=100)
                for tp, records in batch.items():
                    for rec in records:
                        headers = dict(rec.headers or ())
                        raw = headers.get(CORRELATION_HEADER)
                        if raw is not None and raw.decode("utf-8", "replace") == cid:
                            reason = headers.get(DLQ_REASON_HEADER)
                            return DlqRecord(
                                dlq,
                                tp.partition,
                                rec.offset,
                                reason.decode("utf-8", "replace") if reason else None,
                            )
                        if rec.offset + 1 >= min(ends[tp], starts[tp] + DLQ_SCAN_LIMIT) or (
                            until_ms is not None and rec.timestamp > until_ms
                        ):
                            left.discard(tp)
    return None


# ------------------------------------------------------------------------------------ gather


async def gather(
    cid: str,
    spec: PipelineSpec,
    sources: EvidenceSources,
    timeout: float | None = None,
    now: datetime | None = None,
) -> Evidence:
    """All evidence for ``cid``; each source bounded by ``timeout`` seconds."""
    timeout = timeout if timeout is not None else sources.timeout
    t0 = time.perf_counter()
    missing: dict[str, str] = {}
    timings: dict[str, float] = {}
    _timings.set(timings)
    queries = [
        SPANS_SQL,
        PROCESSED_SQL,
        *(effect_sql(s.table) for s in spec.steps if s.table),
        "kafka: DescribeTopics " + ", ".join(s.consumes for s in spec.steps if s.consumes),
        "kafka: DescribeGroups + OffsetFetch " + ", ".join(s.group for s in spec.steps if s.group),
        "kafka: ListOffsets (end offsets) of the consumed topics",
    ]
    spans, db, kafka = await asyncio.gather(
        _bounded("spans", lambda: _spans(sources, cid), timeout, missing),
        _bounded("database", lambda: _database(sources, spec, cid, missing), timeout, missing),
        _bounded("kafka", lambda: _kafka_base(sources, spec), timeout, missing),
    )
    spans = spans or ()
    processed, effects = db if db is not None else (None, {})
    facts = _kafka_facts(spec, spans, kafka) if kafka is not None else {}
    ev = Evidence(
        correlation_id=cid,
        spans=spans,
        kafka=facts,
        processed=processed,
        effects=effects,
        missing=missing,
        queries=tuple(queries),
    )
    # second pass, only for the step where the correlation stopped: wrong group, dead letters
    first = diagnose(spec, ev, now or datetime.now(UTC))
    stop = spec.step(first.stopped_at) if first.stopped_at else None
    kf = facts.get(stop.id) if stop else None
    if stop is not None and kf is not None and kf.topic_exists:
        extra: dict[str, Any] = {}
        step_runs = [s for s in spans if (s.step or s.attributes.get("hoptrace.step")) == stop.id]
        if kf.group_exists is False or kf.group_members == 0:
            parts = kafka[0].get(stop.consumes) or [] if kafka else []
            queries.append(f"kafka: ListGroups + OffsetFetch on {stop.consumes} (other groups)")
            others = await _bounded(
                "kafka (other groups)",
                lambda: _other_groups(sources, stop, parts),
                timeout,
                missing,
            )
            extra["other_groups"] = others
        # a dead-lettered run says so (hoptrace.dlq.topic); a record consumed without any span
        # may have been dead-lettered by an uninstrumented consumer
        lettered = [s for s in step_runs if s.attributes.get("hoptrace.dlq.topic")]
        since = min((s.start_time for s in lettered), default=None)
        until = max((s.end_time or s.start_time for s in lettered), default=None)
        if stop.dlq and (lettered or (not step_runs and kf.record_consumed)):
            where = f"from {since.isoformat()}" if since else f"the last {DLQ_SCAN_LIMIT} records"
            queries.append(f"kafka: scan {stop.dlq} ({where}) for x-correlation-id")
            deadline = time.monotonic() + timeout
            dlq = await _bounded(
                "kafka (dead letters)",
                lambda: _dlq_lookup(sources, stop.dlq, cid, deadline, since, until),
                timeout,
                missing,
            )
            extra["dlq"] = dlq
            extra["dlq_checked"] = "kafka (dead letters)" not in missing
        if extra:
            facts = {**facts, stop.id: replace(kf, **extra)}
    return replace(
        ev,
        kafka=facts,
        missing=dict(missing),
        queries=tuple(queries),
        gathered_in_ms=(time.perf_counter() - t0) * 1000,
        timings_ms=timings,
    )

"""Where a stuck correlation's record is now, for ``plan``: the dead-lettered record, the input
record still in its topic at its offset, the event the emitting step stored (hoptrace's ledger
``processed_events.emitted`` of a runtime step, or a producer's outbox named in the spec), the
step's processed mark, and a previous redrive of the step still in flight.

Records are read by topic/partition/offset with a group-less consumer and checked to be this
correlation's (its ``x-correlation-id`` header, its key or its envelope): a topic recreated
empty may hold another record at the same offset. Tables and columns come from the spec
(identifiers its loader checked); ids are bind parameters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from hoptrace.collector.api import Diagnosis
from hoptrace.contract import PipelineSpec, Step
from hoptrace.contract.conventions import CORRELATION_HEADER, EVENT_ID_HEADER
from hoptrace.instrumentation.envelope import Envelope
from hoptrace.instrumentation.hop.ledger import TABLE as LEDGER_TABLE
from hoptrace.instrumentation.producer import envelope_headers
from hoptrace.kafka import client_options
from hoptrace.settings import KafkaSettings

from . import audit
from .plan import Found, Mark, StoredRecord

#: Seconds a record read may take.
READ_TIMEOUT_S = 5.0
#: A redrive still ``sending`` after this long died before the broker's ack (not in flight).
SENDING_TIMEOUT = timedelta(seconds=60)


def quote(name: str) -> str:
    """A table or column name (optionally schema-qualified) as a quoted SQL identifier."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _belongs(cid: str, key: bytes | None, headers: Sequence[tuple[str, bytes]], value: Any) -> bool:
    for k, v in headers:
        if k == CORRELATION_HEADER and v is not None:
            return v.decode("utf-8", "replace") == cid
    if key is not None and key.decode("utf-8", "replace") == cid:
        return True
    try:
        return Envelope.parse(value).correlation_id == cid
    except Exception:  # noqa: BLE001 - not an envelope: not provably this correlation's
        return False


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def stored_envelope(where: str, raw: Any, cid: str) -> StoredRecord:
    """An event as a producer stored it, with the headers hoptrace's producer sends it with."""
    value = _as_bytes(raw)
    try:
        env = Envelope.parse(value)
    except Exception:  # noqa: BLE001 - not an envelope: sent as stored, with the id header
        return StoredRecord(where, value, cid.encode(), ((CORRELATION_HEADER, cid.encode()),))
    env = env if env.correlation_id else env.with_correlation_id(cid)
    headers = tuple(envelope_headers(env))
    return StoredRecord(where, env.to_bytes(), cid.encode(), headers, env.event_id)


class Sources:
    """The Kafka and database reads of one redrive run (``async with``)."""

    def __init__(self, spec: PipelineSpec, pool: asyncpg.Pool, kafka: KafkaSettings) -> None:
        self.spec = spec
        self.pool = pool
        self.kafka = kafka
        self.bootstrap = kafka.kafka_bootstrap
        self.consumer: AIOKafkaConsumer | None = None
        self.admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()

    async def __aenter__(self) -> Sources:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()

    # ------------------------------------------------------------------------------- kafka

    async def _kafka(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        """The Kafka clients, started on first use (a run with nothing to read needs none)."""
        async with self._start_lock:
            if self.consumer is None or self.admin is None:
                options = client_options(self.kafka)
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    enable_auto_commit=False,
                    group_id=None,
                    **options,
                )
                admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **options)
                try:
                    await consumer.start()
                    await admin.start()
                except BaseException:
                    await consumer.stop()
                    await admin.close()
                    raise
                self.consumer, self.admin = consumer, admin
        return self.consumer, self.admin

    async def topics(self) -> set[str]:
        _, admin = await self._kafka()
        return set(await admin.list_topics())

    async def _bounds(self, tp: TopicPartition) -> tuple[int, int]:
        assert self.consumer is not None
        begins = await self.consumer.beginning_offsets([tp])
        ends = await self.consumer.end_offsets([tp])
        return begins[tp], ends[tp]

    async def in_topic(self, topic: str, partition: int, offset: int) -> bool:
        """Is ``offset`` still held by the partition (between its first and end offsets)?"""
        await self._kafka()
        async with self._lock:
            try:
                begin, end = await self._bounds(TopicPartition(topic, partition))
            except Exception:  # noqa: BLE001 - topic or partition gone
                return False
        return begin <= offset < end

    async def read(
        self, topic: str, partition: int | None, offset: int | None, cid: str
    ) -> StoredRecord | None:
        """The record at ``topic[partition]@offset`` when it is still there and this
        correlation's, else None."""
        if partition is None or offset is None:
            return None
        await self._kafka()
        assert self.consumer is not None
        tp = TopicPartition(topic, partition)
        async with self._lock:
            try:
                begin, end = await self._bounds(tp)
            except Exception:  # noqa: BLE001 - topic or partition gone
                return None
            if not begin <= offset < end:
                return None
            self.consumer.assign([tp])
            self.consumer.seek(tp, offset)
            deadline = asyncio.get_running_loop().time() + READ_TIMEOUT_S
            while asyncio.get_running_loop().time() < deadline:
                batch = await self.consumer.getmany(tp, timeout_ms=200, max_records=50)
                for rec in batch.get(tp, []):
                    if rec.offset < offset:
                        continue
                    if rec.offset > offset:  # compacted or aborted: not there
                        return None
                    headers = tuple((k, v) for k, v in rec.headers or () if v is not None)
                    if not _belongs(cid, rec.key, headers, rec.value):
                        return None
                    return StoredRecord(
                        f"{topic}[{partition}]@{offset}",
                        rec.value or b"",
                        rec.key,
                        headers,
                        _event_id(headers),
                    )
            raise TimeoutError(f"reading {topic}[{partition}]@{offset} took over {READ_TIMEOUT_S}s")

    async def consumed(self, group: str, topic: str, partition: int, offset: int) -> bool:
        """Has ``group`` committed past ``offset`` on ``topic[partition]``?"""
        _, admin = await self._kafka()
        tp = TopicPartition(topic, partition)
        got = await admin.list_consumer_group_offsets(group, partitions=[tp])
        om = got.get(tp)
        return om is not None and om.offset > offset

    # ---------------------------------------------------------------------------- database

    async def stored(self, step: Step, cid: str) -> tuple[StoredRecord | None, str | None]:
        """The event ``step``'s producer stored for ``cid`` (the step itself for a first step,
        else its emitter): (record, None) or (None, why not)."""
        producer = step if not step.consumes else self.spec.emitter(step.id)
        if producer is None:
            return None, f"no step emits {step.consumes}"
        if producer.outbox is not None:
            o = producer.outbox
            sql = (
                f"SELECT {quote(o.event_column)} FROM {quote(o.table)} "  # noqa: S608
                f"WHERE {quote(o.correlation_column)} = $1 LIMIT 1"
            )
            try:
                raw = await self.pool.fetchval(sql, cid)
            except asyncpg.PostgresError as exc:
                return None, f"cannot read {o.table}: {exc}"
            if raw is None:
                return None, (
                    f"{o.table} has no event for {cid}: {producer.service} never stored it, "
                    "so there is nothing to re-emit (submit it again from the producer)"
                )
            return stored_envelope(f"{o.table} ({producer.service}'s outbox)", raw, cid), None
        processed = self.spec.processed_for(producer)
        if producer.consumes and processed.table == LEDGER_TABLE:
            sql = (
                f"SELECT emitted FROM {LEDGER_TABLE} WHERE correlation_id = $1 "  # noqa: S608
                "AND source = $2 AND emitted IS NOT NULL ORDER BY processed_at DESC LIMIT 1"
            )
            raw = await self.pool.fetchval(sql, cid, producer.id)
            if raw is None:
                return None, (
                    f"{LEDGER_TABLE} holds no event {producer.id} emitted for {cid} "
                    f"({producer.id} has not processed it)"
                )
            return stored_envelope(f"{LEDGER_TABLE}.emitted of {producer.id}", raw, cid), None
        return None, (
            f"{producer.id} ({producer.service}) keeps its emitted events nowhere hoptrace can "
            'read: name its outbox in the spec (outbox = { table = "...", correlation_column = '
            '"...", event_column = "..." })'
        )

    async def mark(self, step: Step, cid: str) -> Mark | None:
        """The step's processed mark of ``cid`` (by its source, else by the event type)."""
        p = self.spec.processed_for(step)
        pred = f"{quote(p.correlation_column)} = $1"
        args: tuple[Any, ...]
        if p.source_column:
            names = [n for n in (step.id, step.group) if n]
            sharing = [s for s in self.spec.steps if s.consumes and s.service == step.service]
            if sharing == [step]:
                names.append(step.service)
            pred += f" AND {quote(p.source_column)} = ANY($2::text[])"
            args = (cid, names)
        elif p.event_type_column and step.event_type:
            pred += f" AND {quote(p.event_type_column)} = $2"
            args = (cid, step.event_type)
        else:
            return None
        col = quote(p.event_id_column) if p.event_id_column else "NULL"
        sql = f"SELECT {col}::text FROM {quote(p.table)} WHERE {pred} LIMIT 1"  # noqa: S608
        rows = await self.pool.fetch(sql, *args)
        if not rows:
            return None
        return Mark(p.table, rows[0][0], pred, args)

    # ------------------------------------------------------------------------------- found

    async def find(self, d: Diagnosis, sid: str, now: datetime | None = None) -> Found:
        """Everything ``plan`` needs for step ``sid`` of diagnosis ``d``."""
        step = self.spec.step(sid)
        cid = d.correlation_id
        facts = d.facts
        kf = facts.kafka.get(sid) if facts is not None else None
        existing = await self.topics()
        needed = [t for t in (step.consumes, step.emits) if t]
        missing = tuple(t for t in needed if t not in existing)
        ref = kf.record if kf is not None and kf.record is not None else d.step(sid).consumed
        input_ref = str(ref) if ref is not None and ref.offset is not None else None
        input_record = None
        if ref is not None and step.consumes and step.consumes in existing:
            input_record = await self.read(step.consumes, ref.partition, ref.offset, cid)
        dead = None
        if kf is not None and kf.dlq is not None and kf.dlq.topic in existing:
            dl = kf.dlq
            dead = await self.read(dl.topic, dl.partition, dl.offset, cid)
        stored, why = await self.stored(step, cid)
        mark = await self.mark(step, cid) if step.consumes else None
        return Found(
            step=sid,
            missing_topics=missing,
            input_ref=input_ref,
            input_record=input_record,
            dead_letter=dead,
            stored=stored,
            stored_missing=why,
            mark=mark,
            in_flight=await self.in_flight(step, cid, now),
        )

    async def in_flight(self, step: Step, cid: str, now: datetime | None = None) -> str | None:
        """Why the last redrive of ``step`` is still in flight (its record not consumed yet, or
        consumed within the step's deadline: its spans may be on their way), else None."""
        last = await audit.latest_sent(self.pool, cid, step.id)
        if last is None:
            return None
        now = now or datetime.now(UTC)
        if last.topic is None or last.partition is None or last.offset is None:
            if now - last.at < SENDING_TIMEOUT:
                return f"redrive #{last.id} at {last.at:%H:%M:%S} is still sending"
            return None  # its process died before the broker's ack: not in flight

        sent = f"redrive #{last.id} sent {last.topic}[{last.partition}]@{last.offset}"
        if step.group and not await self.consumed(
            step.group, last.topic, last.partition, last.offset
        ):
            if await self.in_topic(last.topic, last.partition, last.offset):
                return f"{sent} at {last.at:%H:%M:%S}; group {step.group} has not consumed it yet"
            return None
        if now - last.at < step.deadline:
            return f"{sent} at {last.at:%H:%M:%S}; consumed, its spans may still be on their way"
        return None


def _event_id(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for k, v in headers:
        if k == EVENT_ID_HEADER:
            return v.decode("utf-8", "replace")
    return None

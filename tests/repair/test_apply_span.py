"""Applying one action on the real Kafka and PostgreSQL: the processed mark is removed, the
record is published with its correlation headers (dead-letter and old trace headers dropped)
and the redrive's context (traceparent of a new trace, the correlation baggage), the redrive's
span links the original trace, and the audit row says what was sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hoptrace.contract import conventions as c
from hoptrace.instrumentation import configure_tracing, ensure_processed_events, shutdown_tracing
from hoptrace.instrumentation.producer import HopProducer
from hoptrace.repair import apply, audit
from hoptrace.repair.plan import Action, Kind, Mark, StoredRecord
from tests.support import create_topics, delete_topics, unique
from tests.workers.harness import header, read_topic

pytestmark = [pytest.mark.stack]

CID = "pay-apply-1"
ORIGIN = "ab" * 16


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_tracing("hoptrace-redrive-tests", exporter=exporter, simple=True, instrument=False)
    yield exporter
    shutdown_tracing(timeout_s=2.0)


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    name = unique("redrive-apply-")
    asyncio.run(create_topics(kafka_bootstrap, [name], 1))
    yield name
    asyncio.run(delete_topics(kafka_bootstrap, [name]))


def test_send_removes_the_mark_publishes_with_the_redrive_context_and_audits(
    db_url: str, kafka_bootstrap: str, topic: str, spans: InMemorySpanExporter
) -> None:
    record = StoredRecord(
        f"{topic}.dlq[0]@5",
        b'{"event_id": "ev-1"}',
        CID.encode(),
        (
            (c.CORRELATION_HEADER, CID.encode()),
            (c.EVENT_ID_HEADER, b"ev-1"),
            ("traceparent", b"00-" + b"cd" * 16 + b"-" + b"ef" * 8 + b"-01"),
            (c.DLQ_REASON_HEADER, b"boom"),
        ),
        "ev-1",
    )

    async def scenario() -> tuple[apply.Applied, int, asyncpg.Record]:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
        try:
            await audit.ensure(pool)
            await audit.ensure(pool)  # idempotent
            async with pool.acquire() as conn:
                await ensure_processed_events(conn)
                await conn.execute(
                    "INSERT INTO processed_events (event_id, event_type, correlation_id, source)"
                    " VALUES ('ev-1', 'T', $1, 'trainer.allocated')",
                    CID,
                )
            mark = Mark(
                "processed_events",
                "ev-1",
                "correlation_id = $1 AND source = $2",
                (CID, "trainer.allocated"),
            )
            action = Action(
                CID,
                "trainer.allocated",
                "marked_without_effect",
                Kind.REPUBLISH_INPUT,
                "its input record",
                record,
                topic,
                mark,
                (ORIGIN,),
            )
            async with HopProducer(kafka_bootstrap) as producer:
                done = await apply.send(pool, producer, action, "tester")
            left = await pool.fetchval("SELECT count(*) FROM processed_events")
            row = await pool.fetchrow("SELECT * FROM redrives WHERE id = $1", done.audit_id)
            return done, left, row
        finally:
            await pool.close()

    done, left, row = asyncio.run(scenario())
    assert done.result == "sent" and done.sent is not None and left == 0
    (rec,) = asyncio.run(read_topic(kafka_bootstrap, topic))
    assert rec.value == record.value and rec.key == CID.encode()
    assert header(rec, c.CORRELATION_HEADER) == CID and header(rec, c.EVENT_ID_HEADER) == "ev-1"
    assert header(rec, c.DLQ_REASON_HEADER) is None
    assert header(rec, c.REDRIVE_HEADER) == str(done.audit_id)
    traceparent = header(rec, "traceparent")
    assert traceparent is not None and traceparent.split("-")[1] == done.trace_id
    assert f"{c.BAGGAGE_KEY}={CID}" in (header(rec, "baggage") or "")
    (span,) = [s for s in spans.get_finished_spans() if s.name == "redrive trainer.allocated"]
    assert format(span.context.trace_id, "032x") == done.trace_id != ORIGIN
    assert span.parent is None  # a new trace ...
    assert [format(lk.context.trace_id, "032x") for lk in span.links] == [ORIGIN]  # ... linked
    assert span.attributes[c.ATTR_REDRIVE_ORIGIN_TRACE] == ORIGIN
    assert span.attributes[c.ATTR_CORRELATION_ID] == CID
    assert (row["result"], row["who"], row["step"]) == ("sent", "tester", "trainer.allocated")
    assert row["sent"] == f"{topic}[0]@0" and row["trace_id"] == done.trace_id
    assert "1 row removed" in row["removed_mark"]


def test_send_to_a_topic_that_is_gone_fails_and_says_so(
    db_url: str, kafka_bootstrap: str, spans: InMemorySpanExporter
) -> None:
    action = Action(
        CID,
        "session.created",
        "no_consumer",
        Kind.REEMIT_STORED,
        "stored",
        StoredRecord("ledger", b"{}", CID.encode()),
        unique("no-such-topic-"),
        None,
        (ORIGIN,),
    )

    async def scenario() -> tuple[apply.Applied, str]:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            await audit.ensure(pool)
            async with HopProducer(kafka_bootstrap, request_timeout_ms=3000) as producer:
                done = await asyncio.wait_for(apply.send(pool, producer, action, "t"), 60)
            return done, await pool.fetchval("SELECT result FROM redrives")
        finally:
            await pool.close()

    done, result = asyncio.run(scenario())
    assert done.result == "failed" and not done.ok and result == "failed"


def test_a_redrive_still_sending_is_in_flight_until_its_process_is_known_dead(
    db_url: str, kafka_bootstrap: str
) -> None:
    from datetime import timedelta

    from hoptrace.contract import load_spec
    from hoptrace.repair.sources import SENDING_TIMEOUT, Sources
    from hoptrace.settings import KafkaSettings
    from tests.support import REFERENCE_SPEC

    spec = load_spec(REFERENCE_SPEC)
    step = spec.step("trainer.allocated")

    async def scenario() -> tuple[str | None, str | None, str | None]:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            async with Sources(
                spec, pool, KafkaSettings(kafka_bootstrap=kafka_bootstrap)
            ) as sources:
                none = await sources.in_flight(step, CID)
                await audit.ensure(pool)
                await audit.begin(
                    pool,
                    cid=CID,
                    step=step.id,
                    cause="downstream_error",
                    action="republish_dead_letter",
                    result="sending",
                    who="t",
                )
                at = await pool.fetchval("SELECT at FROM redrives")
                fresh = await sources.in_flight(step, CID, now=at + timedelta(seconds=1))
                dead = await sources.in_flight(step, CID, now=at + SENDING_TIMEOUT * 2)
                return none, fresh, dead
        finally:
            await pool.close()

    none, fresh, dead = asyncio.run(scenario())
    assert none is None and dead is None
    assert fresh is not None and "still sending" in fresh

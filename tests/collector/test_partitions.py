"""Span partitions and retention: spans dated far from now are refused (OTLP partial success)
instead of landing in ``spans_default`` for good; rows already in the default partition are moved
out when their day's partition is created (before, ``CREATE … PARTITION OF`` failed, the error was
swallowed and that whole day went to the default partition); the collector's own tables
(``correlations``, ``alerts``) and the default partition are purged by retention too."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from hoptrace.collector import schema
from hoptrace.collector.service import Collector

from .helpers import request, step_span

PB = {"content-type": "application/x-protobuf"}
DAY_NS = 86_400 * 10**9


async def test_spans_dated_far_from_now_are_refused_in_partial_success(
    collector: Collector, db_url: str
) -> None:
    now = time.time_ns()
    far_ahead = step_span("future-1", 0, start_ns=now + 40 * DAY_NS)  # a clock a month off
    long_ago = step_span("past-1", 0, start_ns=now - 400 * DAY_NS)  # older than the retention
    skewed = step_span("skew-1", 0, start_ns=now + 3600 * 10**9)  # an hour ahead: fine
    fine = step_span("fine-1", 0, start_ns=now)
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    async with httpx.AsyncClient() as h:
        body = request([far_ahead, long_ago, skewed, fine]).SerializeToString()
        r = await h.post(url, content=body, headers=PB)
        assert r.status_code == 200, r.text
        partial = ExportTraceServiceResponse.FromString(r.content).partial_success
        assert partial.rejected_spans == 2
        assert "start time" in partial.error_message
        # OTLP/JSON says so too
        r = await h.post(
            url,
            json={
                "resourceSpans": [
                    {
                        "scopeSpans": [
                            {
                                "spans": [
                                    {
                                        "traceId": os.urandom(16).hex(),
                                        "spanId": os.urandom(8).hex(),
                                        "name": "json-future",
                                        "startTimeUnixNano": str(now + 40 * DAY_NS),
                                        "endTimeUnixNano": str(now + 40 * DAY_NS),
                                    }
                                ]
                            }
                        ]
                    }
                ]
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["partialSuccess"]["rejectedSpans"] == "1"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as ch:
        call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        out = ExportTraceServiceResponse.FromString(
            await call(
                request([step_span("future-2", 0, start_ns=now + 40 * DAY_NS)]).SerializeToString()
            )
        )
        assert out.partial_success.rejected_spans == 1
    assert await collector.drain()
    conn = await asyncpg.connect(db_url)
    try:
        stored = {r[0] for r in await conn.fetch("SELECT correlation_id FROM spans")}
        assert stored == {"skew-1", "fine-1"}
        assert await conn.fetchval("SELECT count(*) FROM spans_default") == 0
    finally:
        await conn.close()


async def _insert_span(conn: asyncpg.Connection, cid: str, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO spans (trace_id, span_id, name, service, start_time, end_time, "
        "duration_us, correlation_id) VALUES ($1, $2, 'n', 's', $3, $3, 0, $4)",
        os.urandom(16).hex(),
        os.urandom(8).hex(),
        at,
        cid,
    )


async def test_rows_in_the_default_partition_move_out_when_their_day_is_created(
    db_url: str,
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=3))
        day = datetime.now(UTC).date() + timedelta(days=5)  # beyond the partitions made ahead
        assert schema.partition_name(day) not in await schema.existing_partitions(conn)
        noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        for k in range(3):  # e.g. written by an older collector, or by a clock gone wrong
            await _insert_span(conn, f"early-{k}", noon + timedelta(minutes=k))
        await _insert_span(conn, "other-day", noon + timedelta(days=3))
        assert await conn.fetchval("SELECT count(*) FROM spans_default") == 4

        created = await schema.ensure_partitions(conn, [day])
        assert created == [day]
        assert schema.partition_name(day) in await schema.existing_partitions(conn)
        in_day = await conn.fetch(
            f"SELECT correlation_id FROM {schema.partition_name(day)} ORDER BY 1"  # noqa: S608
        )
        assert [r[0] for r in in_day] == ["early-0", "early-1", "early-2"]
        left = await conn.fetch("SELECT correlation_id FROM spans_default")
        assert [r[0] for r in left] == ["other-day"]
        assert await conn.fetchval("SELECT count(*) FROM spans") == 4  # nothing lost
        # new spans of that day now land in its partition
        await _insert_span(conn, "later", noon + timedelta(hours=1))
        assert await conn.fetchval("SELECT count(*) FROM spans_default") == 1
    finally:
        await conn.close()


async def test_retention_purges_correlations_alerts_and_the_default_partition(
    db_url: str,
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=3))
        old = datetime.now(UTC) - timedelta(days=10)
        await conn.execute(
            "INSERT INTO correlations (correlation_id, pipeline, state, first_seen, updated_at) "
            "VALUES ('old-done', 'p', 'completed', $1, $1), ('old-stuck', 'p', 'stalled', $1, $1),"
            "       ('new', 'p', 'in_progress', now(), now()),"
            "       ('old-but-active', 'p', 'in_progress', $1, now())",
            old,
        )
        await conn.execute(
            "INSERT INTO alerts (correlation_id, status, fired_at, resolved_at) VALUES "
            "('old-done', 'resolved', $1, $1),"  # resolved long ago: purged
            "('old-stuck', 'firing', $1, NULL),"  # its payment is purged: purged with it
            "('new', 'resolved', now(), now()),"  # recent: kept
            "('old-but-active', 'firing', $1, NULL)",  # its payment is still in the window
            old,
        )
        await _insert_span(conn, "ancient", old - timedelta(days=300))
        await _insert_span(conn, "future", datetime.now(UTC) + timedelta(days=300))
        purged = await schema.purge_expired(conn, timedelta(days=3))
        assert purged == {"correlations": 2, "alerts": 2, "spans_default": 1}
        left = {r[0] for r in await conn.fetch("SELECT correlation_id FROM correlations")}
        assert left == {"new", "old-but-active"}
        alerts = {r[0] for r in await conn.fetch("SELECT correlation_id FROM alerts")}
        assert alerts == {"new", "old-but-active"}
        assert [r[0] for r in await conn.fetch("SELECT correlation_id FROM spans_default")] == [
            "future"
        ]
        assert await schema.purge_expired(conn, timedelta(days=3)) == {
            "correlations": 0,
            "alerts": 0,
            "spans_default": 0,
        }
    finally:
        await conn.close()

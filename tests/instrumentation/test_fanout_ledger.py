"""The idempotency ledger: marks keyed by step and event, so two steps consuming one topic under
two groups (fan-out) both handle the same event (keyed by the event alone, the second step took
it as a duplicate); a ledger made before that is re-keyed in place; a step purges its own old
marks (retention)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import asyncpg

from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.instrumentation import Emit, Envelope, HopContext, HopProducer
from hoptrace.instrumentation.hop.ledger import PURGE_BATCH, ensure_processed_events, purge_marks

from ..support import create_topics, delete_topics, unique, wait_for
from .helpers import running, runtime


def _fan_out_spec(tmp_path: Path, suffix: str) -> PipelineSpec:
    path = tmp_path / "fanout.toml"
    path.write_text(
        f"""
[pipeline]
name = "fanout"
correlation_key = "payment_id"
partitions = 1

[[steps]]
id = "paid"
service = "pay"
emits = "paid-{suffix}"
deadline = "5s"

[[steps]]
id = "purchase"
service = "purchases"
consumes = "paid-{suffix}"
group = "purchases-{suffix}"
table = "purchases"
deadline = "30s"

[[steps]]
id = "receipt"
service = "mailer"
consumes = "paid-{suffix}"
group = "mailer-{suffix}"
table = "receipts"
after = ["paid"]
deadline = "30s"
"""
    )
    return load_spec(path)


async def test_two_steps_consuming_one_event_both_handle_it(
    tmp_path: Path, suffix: str, db_url: str, kafka_bootstrap: str
) -> None:
    spec = _fan_out_spec(tmp_path, suffix)
    await create_topics(kafka_bootstrap, spec.topics, partitions=1)
    conn = await asyncpg.connect(db_url)
    await conn.execute("CREATE TABLE purchases (correlation_id text PRIMARY KEY)")
    await conn.execute("CREATE TABLE receipts (correlation_id text PRIMARY KEY)")
    handled: list[str] = []

    def writing(table: str):  # noqa: ANN202 - a handler
        async def handle(ctx: HopContext) -> Emit | None:
            handled.append(ctx.step.id)
            await ctx.conn.execute(f"INSERT INTO {table} VALUES ($1)", ctx.correlation_id)  # noqa: S608
            return None

        return handle

    try:
        cid = unique("pay-")
        async with HopProducer(kafka_bootstrap) as producer:
            await producer.emit(
                spec.step("paid").emits or "", Envelope.new("PAID", 1, cid, {"payment_id": cid})
            )
        purchases = runtime(spec, writing("purchases"), kafka_bootstrap, db_url, step="purchase")
        receipts = runtime(spec, writing("receipts"), kafka_bootstrap, db_url, step="receipt")
        async with running(purchases), running(receipts):

            async def both() -> bool:
                return purchases.stats["ok"] == 1 and receipts.stats["ok"] == 1

            await wait_for(both, timeout=60, what="both steps handled the event")
        assert sorted(handled) == ["purchase", "receipt"]
        marks = await conn.fetch("SELECT source FROM processed_events ORDER BY source")
        assert [m["source"] for m in marks] == ["purchase", "receipt"]
        assert receipts.stats["duplicate"] == 0 and purchases.stats["duplicate"] == 0
    finally:
        await conn.close()
        await delete_topics(kafka_bootstrap, spec.topics)


async def test_a_ledger_keyed_by_event_alone_is_re_keyed(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            """CREATE TABLE processed_events (
                   event_id text PRIMARY KEY, event_type text NOT NULL,
                   correlation_id text NOT NULL, source text NOT NULL,
                   processed_at timestamptz NOT NULL DEFAULT clock_timestamp(), emitted jsonb)"""
        )
        await conn.execute(
            "INSERT INTO processed_events VALUES ('e1', 'T', 'c1', 'purchase', now(), NULL)"
        )
        await ensure_processed_events(conn)
        await ensure_processed_events(conn)  # idempotent
        await conn.execute(
            "INSERT INTO processed_events VALUES ('e1', 'T', 'c1', 'receipt', now(), NULL)"
        )
        assert await conn.fetchval("SELECT count(*) FROM processed_events") == 2
        keys = await conn.fetchval(
            "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = 'processed_events'::regclass AND i.indisprimary"
        )
        assert keys == ["event_id", "source"]
    finally:
        await conn.close()


async def test_a_step_purges_its_own_old_marks_only(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await ensure_processed_events(conn)
        await conn.executemany(
            "INSERT INTO processed_events (event_id, event_type, correlation_id, source,"
            " processed_at) VALUES ($1, 'T', 'c', $2, now() - $3::interval)",
            [
                *[(f"old-{i}", "purchase", timedelta(days=20)) for i in range(PURGE_BATCH + 3)],
                ("new", "purchase", timedelta(days=1)),
                ("other-step", "receipt", timedelta(days=20)),
            ],
        )
        assert await purge_marks(conn, "purchase", timedelta(days=14)) == PURGE_BATCH + 3
        left = await conn.fetch("SELECT event_id FROM processed_events ORDER BY event_id")
        assert [r["event_id"] for r in left] == ["new", "other-step"]
    finally:
        await conn.close()

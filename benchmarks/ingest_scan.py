"""The stall-scan part of the ingest benchmark: 1M in-flight correlations (``in_progress``,
deadlines spread over the next hour, plus the ones made due), the scan statement timed over
repeated runs with nothing due and with 100 due."""

from __future__ import annotations

import statistics
import time

import asyncpg
from ingest_measure import pct


async def scan_phase(db_url: str, n: int, runs: int = 50) -> dict:
    from hoptrace.collector import schema
    from hoptrace.collector.stalls import scan_once

    conn = await asyncpg.connect(db_url)
    try:
        from datetime import timedelta

        await schema.migrate(conn, timedelta(days=1))
        t = time.perf_counter()
        await conn.execute(
            "INSERT INTO correlations (correlation_id, pipeline, state, last_step, last_step_index, "
            "last_step_at, next_step, next_deadline) SELECT 'inflight-' || g, 'payments', 'in_progress', "
            "'purchase.created', 1, now(), 'trainer.allocated', now() + (600 + random() * 3600) * interval '1 second' "
            "FROM generate_series(1, $1) g",
            n,
        )
        load_s = time.perf_counter() - t
        await conn.execute("VACUUM ANALYZE correlations")
        in_flight = await conn.fetchval(
            "SELECT count(*) FROM correlations WHERE state = 'in_progress'"
        )

        async def timed_idle() -> list[float]:
            out = []
            for _ in range(runs):
                t0 = time.perf_counter()
                rows = await scan_once(conn, 1000)
                out.append(time.perf_counter() - t0)
                assert rows == [], "nothing should be due"
            return out

        async def timed_fire(due: int) -> list[float]:
            out = []
            for k in range(runs // 2):
                await conn.execute(
                    "UPDATE correlations SET next_deadline = now() - interval '1 second' WHERE correlation_id "
                    "IN (SELECT 'inflight-' || g FROM generate_series($1::int, $2::int) g)",
                    k * due + 1,
                    (k + 1) * due,
                )
                t0 = time.perf_counter()
                rows = await scan_once(conn, 1000)
                out.append(time.perf_counter() - t0)
                assert len(rows) == due, len(rows)
            return out

        idle = await timed_idle()
        due = await timed_fire(100)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT correlation_id FROM correlations WHERE state = 'in_progress' "
                "AND next_deadline < now() ORDER BY next_deadline LIMIT 1000"
            )
        )
        fired = await conn.fetchval("SELECT count(*) FROM alerts")
        return {
            "correlations_in_flight": in_flight,
            "load_seconds": round(load_s, 1),
            "scan_nothing_due_p50_ms": round(statistics.median(idle) * 1000, 3),
            "scan_nothing_due_p99_ms": round(pct(idle, 99) * 1000, 3),
            "scan_100_due_fire_p50_ms": round(statistics.median(due) * 1000, 3),
            "scan_100_due_fire_p99_ms": round(pct(due, 99) * 1000, 3),
            "uses_deadline_index": "correlations_deadline_idx" in plan,
            "alerts_fired": fired,
        }
    finally:
        await conn.close()

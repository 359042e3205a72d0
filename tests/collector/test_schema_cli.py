"""Schema migration (idempotent), partitions and retention; ``hoptrace stalls``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from hoptrace.collector import schema
from hoptrace.settings import PROJECT_ROOT


async def test_migrate_idempotent_partitions_and_retention(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=3))
        await schema.migrate(conn, timedelta(days=3))  # again: no error, nothing duplicated
        names = await schema.existing_partitions(conn)
        today = datetime.now(UTC).date()
        assert schema.partition_name(today) in names
        assert schema.partition_name(today + timedelta(days=2)) in names
        assert "spans_default" in names
        old = today - timedelta(days=10)
        await schema.ensure_partitions(conn, [old])
        await conn.execute(
            "INSERT INTO spans (trace_id, span_id, name, service, start_time, end_time, duration_us) "
            "VALUES ('a', 'b', 'n', 's', $1, $1, 0)",
            datetime(old.year, old.month, old.day, 12, tzinfo=UTC),
        )
        dropped = await schema.drop_expired(conn, timedelta(days=3))
        assert schema.partition_name(old) in dropped
        assert schema.partition_name(today) not in dropped
        assert await conn.fetchval("SELECT count(*) FROM spans") == 0
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT correlation_id FROM correlations WHERE state = 'in_progress' "
            "AND next_deadline < now() ORDER BY next_deadline LIMIT 100"
        )
        assert "correlations_deadline_idx" in json.dumps(plan)
    finally:
        await conn.close()


async def test_stalls_cli_lists_stalled(db_url: str, hoptrace_env: dict[str, str]) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        await conn.execute(
            "INSERT INTO correlations (correlation_id, pipeline, state, last_step, next_step, next_deadline) "
            "VALUES ('cli-stalled', 'payments', 'stalled', 'purchase.created', 'trainer.allocated', now() - interval '90 seconds'),"
            "       ('cli-ok', 'payments', 'in_progress', 'purchase.created', 'trainer.allocated', now() + interval '1 hour')"
        )
    finally:
        await conn.close()
    exe = os.path.join(PROJECT_ROOT, ".venv", "bin", "hoptrace")
    out = await asyncio.to_thread(
        subprocess.run,
        [exe, "stalls", "--json"],
        env=hoptrace_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["correlation_id"] for r in rows] == ["cli-stalled"]
    assert rows[0]["step"] == "trainer.allocated" and rows[0]["overdue_by_seconds"] >= 90
    text = await asyncio.to_thread(
        subprocess.run,
        [exe, "stalls"],
        env=hoptrace_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        text.returncode == 0 and "cli-stalled" in text.stdout and "trainer.allocated" in text.stdout
    )
    assert "1m3" in text.stdout  # overdue by 1m30s..1m39s


async def test_readonly_role_can_read_store(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
    finally:
        await conn.close()
    ro = await asyncpg.connect(db_url.replace("hoptrace:hoptrace@", "hoptrace_ro:hoptrace_ro@", 1))
    try:
        assert await ro.fetchval("SELECT count(*) FROM spans") == 0
        assert await ro.fetchval("SELECT count(*) FROM correlations") == 0
        with pytest.raises(
            (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)
        ):
            await ro.execute("DELETE FROM alerts")
    finally:
        await ro.close()

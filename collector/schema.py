"""Span store DDL: idempotent migration, daily span partitions, retention by dropping partitions.

Tables:
- ``spans``: one row per span, natively partitioned by range on ``start_time`` (one partition per
  UTC day, ``spans_pYYYYMMDD``, plus ``spans_default`` for far-off timestamps). Primary key
  ``(trace_id, span_id, start_time)`` makes duplicate spans harmless (and serves trace-id lookups);
  a partial index serves correlation-id lookups.
- ``correlations``: per correlation id progress, updated incrementally by the writer.
  ``correlations_deadline_idx`` (partial, ``state = 'in_progress'``) is the stall scan's index.
  ``done_mask`` (bit i: spec step i done) and ``correlations_overview_idx`` make the overview's
  counts (by state, the funnel) index-only scans.
- ``alerts``: stall alerts and their delivery (outbox) state.
- ``stall_scan``: the scan leader's heartbeat (one row).
- ``pending_steps``: step runs of services hoptrace did not write, waiting for their trace to name
  a correlation (see ``runs``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg

from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.settings import get_settings

from .runs import PENDING_DDL
from .state import MASK_STEPS

#: Advisory lock key serialising migrations and partition creation across replicas.
MIGRATE_LOCK = 0x686F7074_0001
#: Advisory lock key held by the stall-scan leader.
SCAN_LOCK = 0x686F7074_0002
#: A ``done_mask`` backfill of at least this many rows is followed by a VACUUM of correlations.
BACKFILL_VACUUM_ROWS = 10_000

DDL = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id        text        COLLATE "C" NOT NULL,
    span_id         text        COLLATE "C" NOT NULL,
    parent_span_id  text        COLLATE "C",
    name            text        NOT NULL,
    service         text        NOT NULL,
    kind            smallint    NOT NULL DEFAULT 0,
    start_time      timestamptz NOT NULL,
    end_time        timestamptz NOT NULL,
    duration_us     bigint      NOT NULL,
    status_code     smallint    NOT NULL DEFAULT 0,
    status_message  text,
    correlation_id  text        COLLATE "C",
    pipeline        text,
    step            text,
    outcome         text,
    attributes      jsonb       NOT NULL DEFAULT '{}',
    events          jsonb       NOT NULL DEFAULT '[]',
    received_at     timestamptz NOT NULL DEFAULT now(),
    resource        jsonb       NOT NULL DEFAULT '{}',
    scope           text,
    PRIMARY KEY (trace_id, span_id, start_time)
) PARTITION BY RANGE (start_time);

CREATE TABLE IF NOT EXISTS spans_default PARTITION OF spans DEFAULT;

CREATE INDEX IF NOT EXISTS spans_correlation_idx ON spans (correlation_id, start_time)
    WHERE correlation_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS correlations (
    correlation_id  text COLLATE "C" PRIMARY KEY,
    pipeline        text,
    state           text NOT NULL DEFAULT 'in_progress'
                    CHECK (state IN ('in_progress', 'completed', 'failed', 'stalled')),
    last_step       text,
    last_step_index integer,
    last_step_at    timestamptz,
    failed_step     text,
    failed_at       timestamptz,
    error           text,
    next_step       text,
    next_deadline   timestamptz,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    steps           jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX IF NOT EXISTS correlations_deadline_idx ON correlations (next_deadline)
    WHERE state = 'in_progress';
CREATE INDEX IF NOT EXISTS correlations_stalled_idx ON correlations (next_deadline)
    WHERE state = 'stalled';
DROP INDEX IF EXISTS correlations_updated_idx;
ALTER TABLE correlations ADD COLUMN IF NOT EXISTS done_mask integer;
-- the overview's counts (state, funnel) as index-only scans over the window
CREATE INDEX IF NOT EXISTS correlations_overview_idx ON correlations (first_seen)
    INCLUDE (state, done_mask);
DROP INDEX IF EXISTS correlations_first_seen_idx;
-- rows still to backfill (written before done_mask existed): empty once migrated
CREATE INDEX IF NOT EXISTS correlations_mask_todo_idx ON correlations (correlation_id)
    WHERE done_mask IS NULL;

CREATE TABLE IF NOT EXISTS alerts (
    id                  bigserial PRIMARY KEY,
    correlation_id      text NOT NULL,
    pipeline            text,
    step                text,
    status              text NOT NULL DEFAULT 'firing' CHECK (status IN ('firing', 'resolved')),
    fired_at            timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    cause               text,
    evidence            text,
    diagnosed           boolean NOT NULL DEFAULT false,
    delivered_firing    boolean NOT NULL DEFAULT false,
    delivered_resolved  boolean NOT NULL DEFAULT false,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    last_error          text
);

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS last_sent_at timestamptz;

CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_firing_idx ON alerts (correlation_id)
    WHERE status = 'firing';
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hoptrace_ro') THEN
        GRANT SELECT ON spans, correlations, alerts TO hoptrace_ro;
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS alerts_correlation_idx ON alerts (correlation_id);
-- the stall-scan leader's heartbeat: a new leader knows how long nobody scanned
CREATE TABLE IF NOT EXISTS stall_scan (
    id          integer PRIMARY KEY CHECK (id = 1),
    heartbeat   timestamptz NOT NULL,
    hold_until  timestamptz  -- set while a new leader holds the deadlines of a gap
);
CREATE INDEX IF NOT EXISTS alerts_outbox_idx ON alerts (next_attempt_at)
    WHERE NOT delivered_firing OR (status = 'resolved' AND NOT delivered_resolved);
"""


def partition_name(day: date) -> str:
    return f"spans_p{day:%Y%m%d}"


def done_mask_sql(spec: PipelineSpec, steps: str = "steps") -> str:
    """SQL expression: the ``done_mask`` of a ``steps`` jsonb (bit i = spec step i done)."""
    return " | ".join(
        f"(CASE WHEN jsonb_typeof({steps}->{_lit(s.id)}->'done_at') IN ('number', 'string') "
        f"THEN {1 << i} ELSE 0 END)"
        for i, s in enumerate(spec.steps)
    )


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _configured_spec() -> PipelineSpec | None:
    try:
        return load_spec(get_settings().pipeline)
    except Exception:  # no readable spec: rows stay unfilled, the funnel reads their steps
        return None


async def migrate(
    conn: asyncpg.Connection,
    retention: timedelta,
    ahead_days: int = 2,
    spec: PipelineSpec | None = None,
) -> None:
    """Create the schema if missing (idempotent, safe with concurrent replicas) and the daily
    partitions from the retention window's start to ``ahead_days`` ahead. Correlations stored
    before ``done_mask`` existed get it filled from their steps (``spec``: default the configured
    pipeline)."""
    spec = spec or _configured_spec()
    filled = 0
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute(DDL)
        await conn.execute(PENDING_DDL)
        if spec is not None and len(spec.steps) <= MASK_STEPS:
            status = await conn.execute(
                f"UPDATE correlations SET done_mask = {done_mask_sql(spec)} "  # noqa: S608
                "WHERE done_mask IS NULL AND (pipeline = $1 OR pipeline IS NULL)",
                spec.name,
            )
            filled = int(status.rsplit(" ", 1)[-1])
    if filled >= BACKFILL_VACUUM_ROWS:
        # index-only scans need the visibility map the big backfill just invalidated
        await conn.execute("VACUUM (ANALYZE) correlations")
    today = datetime.now(UTC).date()
    first = today - timedelta(days=max(0, retention.days) + 1)
    await ensure_partitions(
        conn, [first + timedelta(days=i) for i in range((today - first).days + ahead_days + 1)]
    )


async def existing_partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'spans'"
    )
    return {r["relname"] for r in rows}


async def ensure_partitions(conn: asyncpg.Connection, days: list[date]) -> list[date]:
    """Create the daily partitions for ``days`` that do not exist yet; returns the days created.
    A day whose rows already sit in the default partition is left there (creation would fail)."""
    have = await existing_partitions(conn)
    missing = [d for d in sorted(set(days)) if partition_name(d) not in have]
    created: list[date] = []
    for day in missing:
        lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
        hi = lo + timedelta(days=1)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF spans "
                    f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
                )
            created.append(day)
        except asyncpg.PostgresError:
            # e.g. the default partition already holds rows of that day: they stay there.
            continue
    return created


async def drop_expired(conn: asyncpg.Connection, retention: timedelta) -> list[str]:
    """Retention: drop the daily partitions whose whole day ends before now - retention."""
    cutoff = datetime.now(UTC) - retention
    dropped: list[str] = []
    for name in sorted(await existing_partitions(conn)):
        if not name.startswith("spans_p"):
            continue
        day = datetime.strptime(name[len("spans_p") :], "%Y%m%d").replace(tzinfo=UTC)
        if day + timedelta(days=1) <= cutoff:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
                await conn.execute(f"DROP TABLE IF EXISTS {name}")
            dropped.append(name)
    return dropped

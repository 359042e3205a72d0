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
- ``alerts``: alerts of stalled and of failed correlations (``kind``) and their delivery (outbox)
  state; a dispatcher claims an alert (``claimed_by``/``claimed_until``) before sending it, so two
  collectors never both send one. ``service`` is the alert's step's, ``labels`` the label set the
  alert was first sent with (kept for every later send).
- ``stall_scan``: the scan leader's heartbeat (one row) and its lease (``leader``/``lease_until``):
  a leader that stops renewing it (dead, frozen, cut off) is replaced once it expires.
- ``pending_steps``: step runs of services hoptrace did not write, waiting for their trace to name
  a correlation (see ``runs``).

Retention: daily span partitions are dropped whole (:func:`drop_expired`); correlations idle for
the whole window, alerts resolved before it (or whose correlation is gone) and whatever sits in
the default partition from before it are deleted (:func:`purge_expired`). A day's rows found in
the default partition are moved into that day's partition when it is created
(:func:`ensure_partitions`).
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta

import asyncpg

from hoptrace.contract import PipelineSpec, load_spec
from hoptrace.settings import get_settings

from .runs import PENDING_DDL
from .state import MASK_STEPS

log = logging.getLogger("hoptrace.collector.schema")

#: Advisory lock key serialising migrations and partition creation across replicas.
MIGRATE_LOCK = 0x686F7074_0001
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

# ---------------------------------------------------------------------------------------------
# Stall-scan lease, failed-correlation alerts, delivery claims, retention of the collector's own
# tables. Kept apart from DDL above; each step runs only when its object is missing, so a
# migration of an up-to-date store takes no table lock here.
RELIABILITY_DDL = """
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'stall_scan'::regclass
                   AND attname = 'lease_until' AND NOT attisdropped) THEN
        -- leadership is a lease on the heartbeat row: whoever renews it before it expires leads
        ALTER TABLE stall_scan ADD COLUMN leader text, ADD COLUMN lease_until timestamptz;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'alerts'::regclass
                   AND attname = 'kind' AND NOT attisdropped) THEN
        ALTER TABLE alerts
            ADD COLUMN kind text NOT NULL DEFAULT 'stalled' CHECK (kind IN ('stalled', 'failed')),
            ADD COLUMN claimed_by text,
            ADD COLUMN claimed_until timestamptz;
    END IF;
    -- the scan's sweep for failed correlations (recently updated ones each scan)
    IF to_regclass('correlations_failed_idx') IS NULL THEN
        CREATE INDEX correlations_failed_idx ON correlations (updated_at) WHERE state = 'failed';
    END IF;
    -- firing alerts of failed correlations, resolved by the scan once they are no longer failed
    IF to_regclass('alerts_failed_firing_idx') IS NULL THEN
        CREATE INDEX alerts_failed_firing_idx ON alerts (correlation_id)
            WHERE status = 'firing' AND kind = 'failed';
    END IF;
    -- retention of resolved alerts
    IF to_regclass('alerts_resolved_idx') IS NULL THEN
        CREATE INDEX alerts_resolved_idx ON alerts (resolved_at) WHERE status = 'resolved';
    END IF;
END $$;
"""

# ---------------------------------------------------------------------------------------------
# Alert routing: the service of the alert's step (from the spec, set by the scan) and the label
# set as first sent (Alertmanager identifies an alert by its labels: every later send of the
# alert, re-sends and its resolution, repeats them even if the diagnosis changed meanwhile).
ALERT_ROUTING_DDL = """
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'alerts'::regclass
                   AND attname = 'labels' AND NOT attisdropped) THEN
        ALTER TABLE alerts ADD COLUMN service text, ADD COLUMN labels jsonb;
    END IF;
END $$;
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
        await conn.execute(RELIABILITY_DDL)
        await conn.execute(ALERT_ROUTING_DDL)
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
    Rows of such a day already in the default partition (written before its partition existed)
    are moved into it in the same transaction (``CREATE … PARTITION OF`` refuses while they sit
    there). A partition that still cannot be created is logged and tried again next time."""
    have = await existing_partitions(conn)
    missing = [d for d in sorted(set(days)) if partition_name(d) not in have]
    created: list[date] = []
    for day in missing:
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
                moved = await _create_partition(conn, day)
            created.append(day)
            if moved:
                log.info("moved %d span(s) from spans_default into %s", moved, partition_name(day))
        except asyncpg.PostgresError as exc:
            log.warning("span partition %s not created: %s", partition_name(day), exc)
    return created


async def _span_columns(conn: asyncpg.Connection) -> str:
    """The ``spans`` column list (a default partition's and a day partition's column order may
    differ after the parent gained or lost columns)."""
    return str(
        await conn.fetchval(
            "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
            "WHERE attrelid = 'spans'::regclass AND attnum > 0 AND NOT attisdropped"
        )
    )


async def _create_partition(conn: asyncpg.Connection, day: date) -> int:
    """Create ``day``'s partition (in the caller's transaction), first moving that day's rows out
    of the default partition; returns the number of rows moved."""
    name = partition_name(day)
    lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
    hi = lo + timedelta(days=1)
    bounds = f"FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
    in_day = f"start_time >= '{lo.isoformat()}' AND start_time < '{hi.isoformat()}'"
    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
        return 0  # another replica made it meanwhile
    # the parent first, as an insert locks it (then the partition a row is routed to)
    await conn.execute("LOCK TABLE ONLY spans IN ACCESS EXCLUSIVE MODE")
    await conn.execute("LOCK TABLE spans_default IN ACCESS EXCLUSIVE MODE")
    moved = 0
    cols = ""
    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM spans_default WHERE {in_day})"):  # noqa: S608
        cols = await _span_columns(conn)
        # built from a date and the catalogue's column names only
        gone = f"DELETE FROM spans_default WHERE {in_day} RETURNING {cols}"  # noqa: S608
        keep = f"INSERT INTO hoptrace_moving ({cols}) SELECT {cols} FROM gone"  # noqa: S608
        await conn.execute("CREATE TEMP TABLE hoptrace_moving (LIKE spans) ON COMMIT DROP")
        await conn.execute(f"WITH gone AS ({gone}) {keep}")
        moved = int(await conn.fetchval("SELECT count(*) FROM hoptrace_moving"))
    await conn.execute(f"CREATE TABLE {name} PARTITION OF spans FOR VALUES {bounds}")
    if moved:
        await conn.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM hoptrace_moving")  # noqa: S608
    return moved


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


#: Rows deleted per statement by :func:`purge_expired` (short transactions, short row locks).
PURGE_BATCH = 5000

_PURGE_CORRELATIONS = """
DELETE FROM correlations WHERE correlation_id = ANY(ARRAY(
    SELECT correlation_id FROM correlations
    WHERE first_seen < $1 AND updated_at < $1 LIMIT $2))
"""
_PURGE_ALERTS = """
DELETE FROM alerts WHERE id = ANY(ARRAY(
    SELECT a.id FROM alerts a
    WHERE (a.status = 'resolved' AND a.resolved_at < $1)
       OR (a.fired_at < $1 AND NOT EXISTS (
           SELECT 1 FROM correlations c WHERE c.correlation_id = a.correlation_id))
    LIMIT $2))
"""
_PURGE_DEFAULT = """
DELETE FROM spans_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM spans_default WHERE start_time < $1 LIMIT $2))
"""


async def purge_expired(conn: asyncpg.Connection, retention: timedelta) -> dict[str, int]:
    """Retention of the collector's own rows (the partitions go by :func:`drop_expired`):
    correlations with no activity since now - retention, alerts resolved before then or fired
    before then for a correlation that is gone, and default-partition spans that started before
    then. Deleted in batches; returns the rows deleted per table."""
    cutoff = datetime.now(UTC) - retention
    out: dict[str, int] = {}
    for table, sql in (
        ("correlations", _PURGE_CORRELATIONS),
        ("alerts", _PURGE_ALERTS),
        ("spans_default", _PURGE_DEFAULT),
    ):
        total = 0
        while True:
            status = await conn.execute(sql, cutoff, PURGE_BATCH)
            n = int(status.rsplit(" ", 1)[-1])
            total += n
            if n < PURGE_BATCH:
                break
        out[table] = total
    return out

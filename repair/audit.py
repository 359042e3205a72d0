"""The ``redrives`` table: one row per applied redrive action (who, when, what, result), written
by ``hoptrace redrive --apply``; ``hoptrace migrate`` creates it, and so does the first redrive.
The collector reads it into a lookup's evidence (``hoptrace trace`` and the dashboard show
redrives in the step list); a redrive reads it to send nothing while an earlier one of the same
step is in flight.

Results: ``sending`` (the row exists before the record is sent: its id goes into the record's
header), ``sent``, ``failed``; and, for what was asked but needed nothing, ``waiting``,
``nothing``, ``in_flight``, ``refused``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from hoptrace.contract import RedriveResult
from hoptrace.contract.conventions import REDRIVES_TABLE

T = REDRIVES_TABLE

DDL = f"""
CREATE TABLE IF NOT EXISTS {T} (
    id              bigserial PRIMARY KEY,
    correlation_id  text NOT NULL,
    step            text NOT NULL,
    cause           text NOT NULL,
    action          text NOT NULL,
    result          text NOT NULL,
    who             text NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    source          text,
    sent            text,
    sent_topic      text,
    sent_partition  integer,
    sent_offset     bigint,
    removed_mark    text,
    detail          text,
    trace_id        text,
    origin_trace_id text
);
CREATE INDEX IF NOT EXISTS {T}_correlation_idx ON {T} (correlation_id, at);
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hoptrace_ro') THEN
        GRANT SELECT ON {T} TO hoptrace_ro;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN NULL;
END $$;
"""  # noqa: S608 - the contract's table name

_INSERT = f"""INSERT INTO {T} (correlation_id, step, cause, action, result, who, source,
    removed_mark, detail, trace_id, origin_trace_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id"""  # noqa: S608
_FINISH = f"""UPDATE {T} SET result = $2, sent = $3, sent_topic = $4, sent_partition = $5,
    sent_offset = $6, detail = coalesce($7, detail), removed_mark = coalesce($8, removed_mark)
    WHERE id = $1"""  # noqa: S608
_LATEST_SENT = f"""SELECT id, at, sent_topic, sent_partition, sent_offset FROM {T}
    WHERE correlation_id = $1 AND step = $2
      AND result IN ('{RedriveResult.SENT}', '{RedriveResult.SENDING}')
    ORDER BY at DESC, id DESC LIMIT 1"""  # noqa: S608
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('hoptrace.redrives'))"


async def ensure(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """Create the table (idempotent; one creator at a time)."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c:
            await ensure(c)
        return
    async with conn.transaction():
        await conn.execute(_LOCK)
        await conn.execute(DDL)


async def begin(
    pool: asyncpg.Pool,
    *,
    cid: str,
    step: str,
    cause: str,
    action: str,
    result: str,
    who: str,
    source: str | None = None,
    removed_mark: str | None = None,
    detail: str | None = None,
    trace_id: str | None = None,
    origin_trace_id: str | None = None,
) -> int:
    """A new row; its id."""
    return await pool.fetchval(
        _INSERT,
        cid,
        step,
        cause,
        action,
        result,
        who,
        source,
        removed_mark,
        detail,
        trace_id,
        origin_trace_id,
    )


async def finish(
    pool: asyncpg.Pool,
    row_id: int,
    result: str,
    *,
    sent: tuple[str, int, int] | None = None,
    detail: str | None = None,
    removed_mark: str | None = None,
) -> None:
    """The row's result (and the record sent: topic, partition, offset)."""
    topic, part, off = sent if sent else (None, None, None)
    text = f"{topic}[{part}]@{off}" if sent else None
    await pool.execute(_FINISH, row_id, result, text, topic, part, off, detail, removed_mark)


@dataclass(frozen=True, slots=True)
class Sent:
    """The last record a redrive of a step sent."""

    id: int
    at: datetime
    topic: str | None
    partition: int | None
    offset: int | None


async def latest_sent(pool: asyncpg.Pool, cid: str, step: str) -> Sent | None:
    """The last redrive of ``step`` for ``cid`` that sent (or was sending) a record."""
    try:
        row = await pool.fetchrow(_LATEST_SENT, cid, step)
    except asyncpg.UndefinedTableError:
        return None
    if row is None:
        return None
    return Sent(row["id"], row["at"], row["sent_topic"], row["sent_partition"], row["sent_offset"])

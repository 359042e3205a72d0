"""Batch writer: queue -> COPY into a per-connection staging table -> INSERT .. ON CONFLICT DO
NOTHING into ``spans`` -> fold the new step spans into ``correlations`` -> resolve alerts of
correlations that moved on. One transaction per batch; a failed batch is retried until it lands
(nothing accepted is dropped; meanwhile the queue fills and receivers answer 503)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from hoptrace.instrumentation.spec import PipelineSpec

from . import metrics
from .decode import COLUMNS, I_SPAN, I_START, I_STEP, I_TRACE, SpanRow, us_to_dt
from .schema import ensure_partitions, existing_partitions, partition_name
from .spanqueue import SpanQueue
from .state import StepObs, fold, observations

log = logging.getLogger("hoptrace.collector.writer")

_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS spans_stage (
    trace_id text, span_id text, parent_span_id text, name text, service text, kind smallint,
    start_us bigint, end_us bigint, duration_us bigint, status_code smallint,
    status_message text, correlation_id text, pipeline text, step text, outcome text,
    attributes jsonb, events jsonb, received_us bigint, resource jsonb, scope text
) ON COMMIT DELETE ROWS
"""
_TS = "timestamptz 'epoch' + {} * interval '1 microsecond'"
_TARGET = ", ".join(
    c.replace("_us", "_time") if c in ("start_us", "end_us") else c for c in COLUMNS
).replace("received_us", "received_at")
#: ``spans`` columns in span-row order (for the direct COPY).
SPAN_COLUMNS = tuple(_TARGET.split(", "))
_SOURCE = ", ".join(
    _TS.format(c) if c in ("start_us", "end_us", "received_us") else c for c in COLUMNS
)
_INSERT = f"""
WITH ins AS (
    INSERT INTO spans ({_TARGET}) SELECT {_SOURCE} FROM spans_stage
    ON CONFLICT DO NOTHING RETURNING trace_id, span_id, step
)
SELECT count(*)::int AS n,
       coalesce(array_agg(trace_id || span_id) FILTER (WHERE step IS NOT NULL), '{{}}') AS keys
FROM ins
"""  # noqa: S608 - constant column list
_UNNEST = """unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
            $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::timestamptz[],
            $12::timestamptz[], $13::timestamptz[], $14::text[], $15::int[])
     AS u(cid, pipeline, state, last_step, last_step_index, last_step_at, failed_step, failed_at,
          error, next_step, next_deadline, first_seen, completed_at, steps, done_mask)"""
_INSERT_CORR = f"""
INSERT INTO correlations (correlation_id, pipeline, state, last_step, last_step_index, last_step_at,
    failed_step, failed_at, error, next_step, next_deadline, first_seen, completed_at, steps,
    done_mask)
SELECT u.cid, u.pipeline, u.state, u.last_step, u.last_step_index, u.last_step_at, u.failed_step,
    u.failed_at, u.error, u.next_step, u.next_deadline, u.first_seen, u.completed_at, u.steps::jsonb,
    u.done_mask
FROM {_UNNEST}
ON CONFLICT (correlation_id) DO NOTHING RETURNING correlation_id
"""  # noqa: S608 - constant
_LOCK_CORR = """
SELECT correlation_id, state, last_step_index, first_seen, steps::text AS steps
FROM correlations WHERE correlation_id = ANY($1::text[]) ORDER BY correlation_id FOR UPDATE
"""
_UPDATE_CORR = """
UPDATE correlations c SET
    pipeline = u.pipeline, state = u.state, last_step = u.last_step,
    last_step_index = u.last_step_index, last_step_at = u.last_step_at,
    failed_step = u.failed_step, failed_at = u.failed_at, error = u.error,
    next_step = u.next_step, next_deadline = u.next_deadline, first_seen = u.first_seen,
    completed_at = u.completed_at, steps = u.steps::jsonb, done_mask = u.done_mask,
    updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::timestamptz[],
            $7::text[], $8::timestamptz[], $9::text[], $10::text[], $11::timestamptz[],
            $12::timestamptz[], $13::timestamptz[], $14::text[], $15::int[])
     AS u(cid, pipeline, state, last_step, last_step_index, last_step_at, failed_step, failed_at,
          error, next_step, next_deadline, first_seen, completed_at, steps, done_mask)
WHERE c.correlation_id = u.cid
"""
_RESOLVE = """
UPDATE alerts SET status = 'resolved', resolved_at = now(), next_attempt_at = now()
WHERE correlation_id = ANY($1::text[]) AND status = 'firing'
"""
_FIELDS = (
    "pipeline",
    "state",
    "last_step",
    "last_step_index",
    "last_step_at",
    "failed_step",
    "failed_at",
    "error",
    "next_step",
    "next_deadline",
    "first_seen",
    "completed_at",
)


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_US = 946_684_800_000_000
_ONE_US = timedelta(microseconds=1)


def _encode_ts(value: int | datetime) -> tuple[int]:
    """timestamptz from an aware datetime or integer microseconds since the Unix epoch."""
    if type(value) is int:
        return (value - _PG_EPOCH_US,)
    return ((value - _PG_EPOCH) // _ONE_US,)  # type: ignore[operator]


def _decode_ts(value: tuple[int]) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=value[0])


async def init_connection(conn: asyncpg.Connection) -> None:
    """Pool ``init``: the per-connection staging table, and timestamptz accepting integer
    microseconds (span rows carry ints: no datetime per value on the hot path)."""
    await conn.execute(_STAGE_DDL)
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=_encode_ts, decoder=_decode_ts, format="tuple"
    )


class Writer:
    """Writes batches of span rows; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, spec: PipelineSpec, retention: timedelta) -> None:
        self.pool = pool
        self.spec = spec
        self.retention = retention
        self._days: set[date] = set()
        self.inflight = 0  # batches taken from the queue and not yet written

    async def _ensure_days(self, conn: asyncpg.Connection, rows: list[SpanRow]) -> None:
        days = {
            us_to_dt(us).date()
            for us in {r[I_START] // 86_400_000_000 * 86_400_000_000 for r in rows}
        }
        unknown = days - self._days
        if not unknown:
            return
        today = datetime.now(UTC).date()
        window = [
            d
            for d in unknown
            if today - self.retention - timedelta(days=1) <= d <= today + timedelta(days=7)
        ]
        if window:
            await ensure_partitions(conn, window)
        have = await existing_partitions(conn)
        self._days |= {d for d in unknown if partition_name(d) in have}

    async def write(self, rows: list[SpanRow]) -> int:
        """Store one batch atomically; returns the number of new spans (duplicates excluded)."""
        if not rows:
            return 0
        t0 = time.perf_counter()
        async with self.pool.acquire() as conn:
            await self._ensure_days(conn, rows)
            async with conn.transaction():
                n = await self._copy_direct(conn, rows)
                if n is not None:  # all new: every step span counts
                    step_rows = [r for r in rows if r[I_STEP] is not None]
                else:  # some already stored: staging table + ON CONFLICT DO NOTHING
                    await conn.copy_records_to_table("spans_stage", records=rows, columns=COLUMNS)
                    res = await conn.fetchrow(_INSERT)
                    n = res["n"]
                    keys = set(res["keys"])
                    step_rows = []
                    for r in rows:  # each new key once (a batch may repeat a span)
                        k = r[I_TRACE] + r[I_SPAN]
                        if r[I_STEP] is not None and k in keys:
                            keys.discard(k)
                            step_rows.append(r)
                if step_rows:
                    await self._fold(conn, step_rows)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.SPANS_STORED.inc(n)
        if len(rows) > n:
            metrics.SPANS_DUPLICATE.inc(len(rows) - n)
        return n

    async def _copy_direct(self, conn: asyncpg.Connection, rows: list[SpanRow]) -> int | None:
        """COPY straight into ``spans`` (the common case: no duplicates); None when a span is
        already there (the savepoint is rolled back and the caller takes the staging path)."""
        try:
            async with conn.transaction():
                await conn.copy_records_to_table("spans", records=rows, columns=SPAN_COLUMNS)
        except asyncpg.UniqueViolationError:
            return None
        return len(rows)

    async def _fold(self, conn: asyncpg.Connection, rows: list[SpanRow]) -> None:
        obs = observations(rows, self.spec)
        if obs:
            await self._apply(conn, obs, sorted(obs))

    async def _apply(
        self, conn: asyncpg.Connection, obs: dict[str, list[StepObs]], cids: list[str]
    ) -> None:
        """Lock the existing rows (sorted: no deadlock between writers), fold, then UPDATE the
        existing and INSERT the new ones; ids another writer inserted meanwhile go round again."""
        current = {r["correlation_id"]: r for r in await conn.fetch(_LOCK_CORR, cids)}
        now = datetime.now(UTC)
        upd: list[list[Any]] = [[] for _ in range(15)]
        ins: list[list[Any]] = [[] for _ in range(15)]
        resolved: list[str] = []
        for cid in cids:
            rec = current.get(cid)
            row = None
            cols = ins
            if rec is not None:
                cols = upd
                row = dict(rec)
                row["steps"] = orjson.loads(rec["steps"]) if rec["steps"] else {}
            new = fold(self.spec, row, obs[cid], now)
            if new["resolved"]:
                resolved.append(cid)
            cols[0].append(cid)
            for i, f in enumerate(_FIELDS, start=1):
                cols[i].append(new[f])
            cols[13].append(orjson.dumps(new["steps"]).decode())
            cols[14].append(new["done_mask"])
        if upd[0]:
            await conn.execute(_UPDATE_CORR, *upd)
        if resolved:
            await conn.execute(_RESOLVE, resolved)
        if ins[0]:
            done = {r[0] for r in await conn.fetch(_INSERT_CORR, *ins)}
            raced = [c for c in ins[0] if c not in done]
            if raced:
                await self._apply(conn, obs, raced)


async def run_writer(writer: Writer, queue: SpanQueue, batch_spans: int) -> None:
    """Forever: take a batch from the queue and write it, retrying with backoff until it lands."""
    while True:
        items = await queue.take(batch_spans)
        writer.inflight += 1
        metrics.QUEUE_DEPTH.set(queue.depth)
        rows = [r for it in items for r in it.rows]
        delay = 0.1
        while True:
            try:
                await writer.write(rows)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # DB down, deadlock, ...: retry the same batch
                metrics.WRITE_ERRORS.inc()
                log.warning("span batch write failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        writer.inflight -= 1
        for it in items:
            if it.done is not None and not it.done.done():
                it.done.set_result(None)

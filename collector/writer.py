"""Batch writer: queue -> COPY into a per-connection staging table -> INSERT .. ON CONFLICT DO
NOTHING into ``spans`` -> fold the new step runs into ``correlations`` (hoptrace's step spans,
and the runs of services hoptrace did not write, completed from the store by ``runs``) -> resolve
alerts of correlations that moved on. One transaction per batch; a failed batch is retried until
it lands (nothing accepted is dropped; meanwhile the queue fills and receivers answer 503)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from hoptrace.contract import PipelineSpec
from hoptrace.contract.conventions import DESTINATION_KEYS, STATUS_ERROR, SpanKind
from hoptrace.contract.matching import StepMatcher

from . import metrics, runs
from .decode import (
    C_SPAN,
    C_TRACE,
    COLUMNS,
    DAY_US,
    I_SPAN,
    I_START,
    I_STEP,
    I_TRACE,
    Encoded,
    SpanRow,
    us_to_dt,
)
from .schema import ensure_partitions, existing_partitions, partition_name
from .spanqueue import SpanQueue, Spans
from .state import Run, StepObs, fold, foreign_runs, observations

log = logging.getLogger("hoptrace.collector.writer")

#: The staging table has the ``spans`` columns and types (binary COPY tuples fit both).
_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS spans_stage_v2 (LIKE spans) ON COMMIT DELETE ROWS
"""
_TARGET = ", ".join(
    c.replace("_us", "_time") if c in ("start_us", "end_us") else c for c in COLUMNS
).replace("received_us", "received_at")
#: ``spans`` columns in span-row order (for the COPYs).
SPAN_COLUMNS = tuple(_TARGET.split(", "))
#: The new rows of a batch that step matching may read: step spans and candidates (consumer and
#: producer spans, failed spans, spans naming a messaging destination).
_MATCHABLE = (
    f"step IS NOT NULL OR kind IN ({SpanKind.PRODUCER.value}, {SpanKind.CONSUMER.value}) "
    f"OR status_code = {STATUS_ERROR} OR attributes ?| ARRAY["
    + ", ".join(f"'{k}'" for k in DESTINATION_KEYS)
    + "]"
)
_INSERT = f"""
WITH ins AS (
    INSERT INTO spans ({_TARGET}) SELECT {_TARGET} FROM spans_stage_v2
    ON CONFLICT DO NOTHING RETURNING trace_id, span_id, step, kind, status_code, attributes
)
SELECT count(*)::int AS n,
       coalesce(array_agg(trace_id || span_id) FILTER (WHERE {_MATCHABLE}), '{{}}') AS keys
FROM ins
"""  # noqa: S608 - constant column list
#: PostgreSQL binary COPY framing around native tuples.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"
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
SELECT correlation_id, state, last_step_index, first_seen, next_step, next_deadline,
       steps::text AS steps
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
#: A stall's alert resolves when its correlation moves on; a failure's alert is the scan's to
#: resolve (once the correlation is no longer failed).
_RESOLVE = """
UPDATE alerts SET status = 'resolved', resolved_at = now(), next_attempt_at = now()
WHERE correlation_id = ANY($1::text[]) AND status = 'firing' AND kind = 'stalled'
"""
#: The correlation row fields bound to $2..$13, as ``_UNNEST`` names them (between the id and
#: ``steps, done_mask``): ``fold``'s keys, in the statements' order.
_FIELDS = tuple(c.strip() for c in _UNNEST.rsplit("AS u(", 1)[1].rstrip(")").split(","))[1:-2]


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


class _Chunks:
    """An async iterable over byte strings (asyncpg's COPY source; re-iterable for a retry)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class Writer:
    """Writes batches of span rows; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, spec: PipelineSpec, retention: timedelta) -> None:
        self.pool = pool
        self.spec = spec
        self.matcher = StepMatcher(spec)
        self.retention = retention
        self._days: set[date] = set()
        self.inflight = 0  # batches taken from the queue and not yet written
        #: why the last batch write failed; None once a write succeeded (readiness reads it)
        self.last_error: str | None = None

    async def _ensure_days(self, conn: asyncpg.Connection, day_numbers: set[int]) -> None:
        """Partitions for the UTC days (``start_us // DAY_US``) a batch's spans start on."""
        days = {us_to_dt(d * DAY_US).date() for d in day_numbers}
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
        """Store one batch of Python span rows atomically; returns the number of new spans
        (duplicates excluded)."""
        return await self.write_spans([rows])

    async def write_spans(self, batches: list[Spans]) -> int:
        """Store span rows and/or natively encoded spans atomically, as one batch; returns the
        number of new spans (duplicates excluded)."""
        rows: list[SpanRow] = []
        blobs: list[bytes] = []
        steps: list[SpanRow] = []
        candidates: list[SpanRow] = []
        days: set[int] = set()
        for b in batches:
            if type(b) is Encoded:
                blobs.append(b.copy)
                steps += b.steps
                candidates += b.candidates
                days.update(b.days)
            else:
                rows += b  # type: ignore[arg-type]
                candidates += getattr(b, "candidates", ())
        if rows:
            steps += [r for r in rows if r[I_STEP] is not None]
            days.update({r[I_START] // DAY_US for r in rows})
        total = len(rows) + sum(b.n for b in batches if type(b) is Encoded)  # type: ignore[union-attr]
        if not total:
            return 0
        copy = [COPY_HEADER, *blobs, COPY_TRAILER] if blobs else None
        t0 = time.perf_counter()
        async with self.pool.acquire() as conn:
            await self._ensure_days(conn, days)
            async with conn.transaction():
                n: int = total
                if not await self._copy_direct(conn, rows, copy):
                    # some already stored: staging table + ON CONFLICT DO NOTHING
                    await self._copy(conn, "spans_stage_v2", rows, copy)
                    res = await conn.fetchrow(_INSERT)
                    n = res["n"]
                    keys = set(res["keys"])
                    steps = _new(steps, keys, I_TRACE, I_SPAN)
                    candidates = _new(candidates, keys, C_TRACE, C_SPAN)
                # all new on the direct COPY: every step span and candidate counts
                await self._fold(conn, steps, candidates)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.SPANS_STORED.inc(n)
        if total > n:
            metrics.SPANS_DUPLICATE.inc(total - n)
        return n

    @staticmethod
    async def _copy(
        conn: asyncpg.Connection, table: str, rows: list[SpanRow], copy: list[bytes] | None
    ) -> None:
        if copy is not None:  # binary COPY data in pieces, sent as they are (no joined copy)
            await conn.copy_to_table(
                table, source=_Chunks(copy), columns=SPAN_COLUMNS, format="binary"
            )
        if rows:
            await conn.copy_records_to_table(table, records=rows, columns=SPAN_COLUMNS)

    async def _copy_direct(
        self, conn: asyncpg.Connection, rows: list[SpanRow], copy: list[bytes] | None
    ) -> bool:
        """COPY straight into ``spans`` (the common case: no duplicates); False when a span is
        already there (the savepoint is rolled back and the caller takes the staging path)."""
        try:
            async with conn.transaction():
                await self._copy(conn, "spans", rows, copy)
        except asyncpg.UniqueViolationError:
            return False
        return True

    async def _fold(
        self, conn: asyncpg.Connection, steps: list[SpanRow], candidates: list[SpanRow]
    ) -> None:
        unresolved: list[Run] = []
        obs = observations(steps, self.matcher, unresolved) if steps else {}
        found = (foreign_runs(candidates, self.matcher) if candidates else []) + unresolved
        for extra in (
            await runs.settle(conn, found) if found else {},
            await runs.unpark(conn),
        ):
            for cid, more in extra.items():
                obs.setdefault(cid, []).extend(more)
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


def _new(rows: list[SpanRow], keys: set[str], trace: int, span: int) -> list[SpanRow]:
    """The rows whose span the INSERT stored (each once: a batch may repeat a span)."""
    out = []
    for r in rows:
        k = r[trace] + r[span]
        if k in keys:
            keys.discard(k)
            out.append(r)
    return out


async def run_writer(writer: Writer, queue: SpanQueue, batch_spans: int) -> None:
    """Forever: take a batch from the queue and write it, retrying with backoff until it lands."""
    while True:
        items = await queue.take(batch_spans)
        writer.inflight += 1
        metrics.QUEUE_DEPTH.set(queue.depth)
        batches = [it.spans for it in items]
        delay = 0.1
        while True:
            try:
                await writer.write_spans(batches)
                writer.last_error = None
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # DB down, deadlock, ...: retry the same batch
                writer.last_error = f"{type(exc).__name__}: {exc}"
                metrics.WRITE_ERRORS.inc()
                log.warning("span batch write failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        writer.inflight -= 1
        for it in items:
            if it.done is not None and not it.done.done():
                it.done.set_result(None)

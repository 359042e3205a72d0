"""Stall detection: a periodic scan over the ``next_deadline`` index, led by one replica.

Only the holder of a session-level Postgres advisory lock scans (and dispatches alerts). A scan
marks overdue ``in_progress`` correlations ``stalled`` and inserts one firing alert per
correlation in the same statement (a partial unique index guarantees at most one firing alert per
correlation); the writer resolves it when the correlation moves on. New alerts get a cause from
the pluggable ``cause_for(correlation_id) -> (cause, evidence)`` hook before delivery.

The leader writes a heartbeat each scan (``stall_scan``). A scanner that takes over after a gap
(no collector scanned, e.g. the collector was down, so the spans the SDKs held are still on their
way) holds the deadlines that passed in that blind window for ``grace`` seconds instead of
alerting on them: when the grace ends it judges them by span times. A step that got done on time
gets no alert; one done after its deadline gets one alert, fired at the deadline and resolved at
the step's end (so every late payment is still announced once); one still not done is fired as
stalled by the scan as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from hoptrace.contract import PipelineSpec

from . import metrics
from .decode import us_to_dt
from .schema import SCAN_LOCK

log = logging.getLogger("hoptrace.collector.stalls")

CauseFn = Callable[[str], Awaitable[tuple[str | None, str | None]]]

SCAN_SQL = """
WITH upd AS (
    UPDATE correlations SET state = 'stalled', updated_at = now()
    WHERE correlation_id = ANY(ARRAY(
        SELECT correlation_id FROM correlations
        WHERE state = 'in_progress' AND next_deadline < now()
          AND (next_deadline < $2 OR next_deadline >= $3)
        ORDER BY next_deadline LIMIT $1
        FOR UPDATE SKIP LOCKED
    )) AND state = 'in_progress'
    RETURNING correlation_id, pipeline, next_step
)
INSERT INTO alerts (correlation_id, pipeline, step)
SELECT correlation_id, pipeline, next_step FROM upd
ON CONFLICT (correlation_id) WHERE status = 'firing' DO NOTHING
RETURNING id, correlation_id
"""


async def no_cause(correlation_id: str) -> tuple[str | None, str | None]:
    """Default cause hook: no diagnosis."""
    return None, None


_HEARTBEAT = """
INSERT INTO stall_scan (id, heartbeat) VALUES (1, now())
ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat
RETURNING (SELECT heartbeat FROM stall_scan WHERE id = 1) AS previous, heartbeat AS now
"""
_HOLD = "UPDATE stall_scan SET hold_until = $1 WHERE id = 1"
_MOVED = """
SELECT c.correlation_id, c.pipeline, c.steps::text AS steps,
       coalesce(array_agg(a.step) FILTER (WHERE a.step IS NOT NULL), '{}') AS alerted
FROM correlations c LEFT JOIN alerts a ON a.correlation_id = c.correlation_id
WHERE c.updated_at >= $1 AND c.pipeline = $2
GROUP BY c.correlation_id
"""
_LATE = """
INSERT INTO alerts (correlation_id, pipeline, step, status, fired_at, resolved_at, evidence,
                    diagnosed)
SELECT u.cid, $1, u.step, 'resolved', u.due, u.done, u.evidence, true
FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[])
     AS u(cid, step, due, done, evidence)
"""

#: No deadline is held.
NO_TIME = datetime(1, 1, 1, tzinfo=UTC)


async def scan_once(
    conn: asyncpg.Connection,
    limit: int = 1000,
    hold_from: datetime = NO_TIME,
    hold_to: datetime = NO_TIME,
) -> list[tuple[int, str]]:
    """One scan: mark overdue correlations stalled, fire their alerts; returns (alert id, cid).
    Deadlines in ``[hold_from, hold_to)`` are held (not judged by this scan)."""
    rows = await conn.fetch(SCAN_SQL, limit, hold_from, hold_to)
    return [(r["id"], r["correlation_id"]) for r in rows]


def late_steps(
    spec: PipelineSpec, steps: dict[str, dict[str, int | None]], since: datetime, until: datetime
) -> list[tuple[str, datetime, datetime]]:
    """(step, deadline, done) of each step of ``steps`` (a correlation's per-step record) done
    after its deadline, for the deadlines in ``[since, until)``."""
    # a later step done means this one was done by then (its own first span may be a
    # redelivery's, after a crash lost the original one): done times only move earlier
    done_at: list[int | None] = [(steps.get(s.id) or {}).get("done_at") for s in spec.steps]
    for i in range(len(done_at) - 2, -1, -1):
        later = done_at[i + 1]
        if later is not None and (done_at[i] is None or later < done_at[i]):  # type: ignore[operator]
            done_at[i] = later
    out = []
    for i, step in enumerate(spec.steps[1:], start=1):
        a, b = done_at[i - 1], done_at[i]
        if a is None or b is None:
            continue
        due, done = us_to_dt(a) + step.deadline, us_to_dt(b)
        if since <= due < until and done > due:
            out.append((step.id, due, done))
    return out


async def alert_late(
    conn: asyncpg.Connection, spec: PipelineSpec, since: datetime, until: datetime
) -> int:
    """One resolved alert (fired at the deadline, resolved when the step got done) per step of
    a correlation that moved on since ``since`` and was late for a deadline in ``[since, until)``
    without an alert for that step; returns the number inserted."""
    cids: list[str] = []
    cols: tuple[list[str], list[datetime], list[datetime], list[str]] = ([], [], [], [])
    for r in await conn.fetch(_MOVED, since, spec.name):
        steps = orjson.loads(r["steps"]) if r["steps"] else {}
        for step, due, done in late_steps(spec, steps, since, until):
            if step in r["alerted"]:
                continue
            late = (done - due).total_seconds()
            cids.append(r["correlation_id"])
            for col, value in zip(
                cols, (step, due, done, f"{step} done {late:.1f}s after its deadline, while no "
                       "collector was scanning (judged from span times)"), strict=True
            ):  # fmt: skip
                col.append(value)  # type: ignore[arg-type]
    if cids:
        await conn.execute(_LATE, spec.name, cids, *cols)
    return len(cids)


class StallScanner:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        interval: float = 1.0,
        cause_for: CauseFn = no_cause,
        limit: int = 1000,
        cause_timeout: float = 15.0,
        spec: PipelineSpec | None = None,
        grace: float = 0.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.interval = interval
        self.cause_for = cause_for
        self.limit = limit
        self.cause_timeout = cause_timeout
        self.spec = spec
        self.grace = grace
        # the blind window being held ([from, to) of deadlines) and when the hold ends
        self.hold: tuple[datetime, datetime] | None = None
        self.hold_until: datetime | None = None
        self._conn: asyncpg.Connection | None = None
        self._diag: set[asyncio.Task[None]] = set()
        self.scans = 0

    @property
    def is_leader(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def _lead(self) -> bool:
        if self.is_leader:
            return True
        conn = await asyncpg.connect(self.dsn)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", SCAN_LOCK):
            self._conn = conn
            beat = await conn.fetchrow(_HEARTBEAT)
            previous, now = beat["previous"], beat["now"]
            gap = previous is not None and now - previous > timedelta(seconds=2 * self.interval + 1)
            if gap and self.grace > 0 and self.spec is not None:
                self.hold_until = now + timedelta(seconds=self.grace)
                self.hold = (previous, self.hold_until)
                await conn.execute(_HOLD, self.hold_until)
                log.info(
                    "stall scan leadership acquired after %.1fs without a scanner: deadlines "
                    "since %s are judged in %.1fs, once the spans held meanwhile have arrived",
                    (now - previous).total_seconds(), previous.isoformat(), self.grace,
                )  # fmt: skip
            else:
                log.info("stall scan leadership acquired")
            return True
        await conn.close()
        return False

    async def tick(self) -> list[tuple[int, str]]:
        """Scan if leader; returns the alerts fired."""
        if not await self._lead():
            return []
        assert self._conn is not None
        t0 = time.perf_counter()
        hold_from, hold_to = NO_TIME, NO_TIME
        if self.hold is not None:
            if self.hold_until is not None and datetime.now(UTC) < self.hold_until:
                hold_from, hold_to = self.hold
            else:  # the grace is over: judge the held window by span times, then scan it
                assert self.spec is not None
                late = await alert_late(self._conn, self.spec, *self.hold)
                if late:
                    metrics.ALERTS_FIRED.inc(late)
                    log.info("%d step(s) were late while no collector scanned: alerted", late)
                self.hold = self.hold_until = None
                await self._conn.execute(_HOLD, None)
        # the heartbeat first: every deadline before it is judged by this scan
        await self._conn.execute(_HEARTBEAT)
        fired = await scan_once(self._conn, self.limit, hold_from, hold_to)
        metrics.SCAN_SECONDS.observe(time.perf_counter() - t0)
        self.scans += 1
        if fired:
            metrics.ALERTS_FIRED.inc(len(fired))
            task = asyncio.create_task(self._diagnose(fired))
            self._diag.add(task)
            task.add_done_callback(self._diag.discard)
        if self.scans % 5 == 1 or fired:
            metrics.STALLED.set(
                await self._conn.fetchval(
                    "SELECT count(*) FROM correlations WHERE state = 'stalled'"
                )
            )
        return fired

    async def _diagnose(self, fired: list[tuple[int, str]]) -> None:
        sem = asyncio.Semaphore(8)

        async def one(alert_id: int, cid: str) -> None:
            async with sem:
                try:
                    cause, evidence = await asyncio.wait_for(
                        self.cause_for(cid), self.cause_timeout
                    )
                except Exception as exc:  # a broken diagnosis never blocks the alert
                    log.warning("cause_for(%s) failed: %s", cid, exc)
                    cause, evidence = None, None
                await self.pool.execute(
                    "UPDATE alerts SET cause = $2, evidence = $3, diagnosed = true WHERE id = $1",
                    alert_id,
                    cause,
                    evidence,
                )

        await asyncio.gather(*(one(a, c) for a, c in fired), return_exceptions=True)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stall scan failed: %s", exc)
                await self.release()
            await asyncio.sleep(self.interval)

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
        for t in list(self._diag):
            t.cancel()

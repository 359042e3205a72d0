"""Stall detection: a periodic scan over the ``next_deadline`` index, led by one replica.

Only the holder of a session-level Postgres advisory lock scans (and dispatches alerts). A scan
marks overdue ``in_progress`` correlations ``stalled`` and inserts one firing alert per
correlation in the same statement (a partial unique index guarantees at most one firing alert per
correlation); the writer resolves it when the correlation moves on. New alerts get a cause from
the pluggable ``cause_for(correlation_id) -> (cause, evidence)`` hook before delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from . import metrics
from .schema import SCAN_LOCK

log = logging.getLogger("hoptrace.collector.stalls")

CauseFn = Callable[[str], Awaitable[tuple[str | None, str | None]]]

SCAN_SQL = """
WITH upd AS (
    UPDATE correlations SET state = 'stalled', updated_at = now()
    WHERE correlation_id = ANY(ARRAY(
        SELECT correlation_id FROM correlations
        WHERE state = 'in_progress' AND next_deadline < now()
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


async def scan_once(conn: asyncpg.Connection, limit: int = 1000) -> list[tuple[int, str]]:
    """One scan: mark overdue correlations stalled, fire their alerts; returns (alert id, cid)."""
    rows = await conn.fetch(SCAN_SQL, limit)
    return [(r["id"], r["correlation_id"]) for r in rows]


class StallScanner:
    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        interval: float = 1.0,
        cause_for: CauseFn = no_cause,
        limit: int = 1000,
        cause_timeout: float = 15.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.interval = interval
        self.cause_for = cause_for
        self.limit = limit
        self.cause_timeout = cause_timeout
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
        fired = await scan_once(self._conn, self.limit)
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

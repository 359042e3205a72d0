"""Stuck-payment detection: a periodic scan led by one replica, which fires one alert per stalled
and per failed correlation.

Leadership is a lease on the ``stall_scan`` heartbeat row (:mod:`.lease`), renewed in each scan's
own transaction: a leader that dies or hangs is replaced within seconds, and a scan's writes happen
only under a valid lease. A scan, in that transaction:

- resolves the alerts of failed correlations that are no longer failed (redelivered from the
  dead-letter topic and moved on);
- marks overdue ``in_progress`` correlations ``stalled`` and inserts one firing alert per
  correlation in the same statement (a partial unique index guarantees at most one firing alert per
  correlation); the writer resolves it when the correlation moves on;
- fires an alert (``kind = 'failed'``) for each ``failed`` correlation without a firing alert: a
  step that errored for good (dead-lettered). A stalled payment whose step is then dead-lettered
  has its stall alert resolved by the writer and gets its failure alert at the next scan. Each
  scan looks at the correlations updated since the previous one (and all of them once, when it
  takes the lease).

New alerts get a cause from the pluggable ``cause_for(correlation_id) -> (cause, evidence)`` hook
before delivery, and the service of their step from the spec (both become alert labels, so an
Alertmanager groups the payments stuck at one step for one cause into one notification).

The leader also keeps ``hoptrace_stalled_correlations`` / ``hoptrace_failed_correlations``
``{pipeline, step, cause}`` (a GROUP BY over the stuck correlations joined with their firing
alert's cause) every fifth scan and whenever it fires; a replica that loses the lease drops them.

Some deadlines are held instead of judged (:mod:`.stall_hold`, which judges them by span times
when the hold ends):

- after a gap (no collector scanned, e.g. the collector was down, so the spans the SDKs held are
  still on their way), for ``grace`` seconds after the takeover;
- while span intake is behind (``behind()``: the write queue full, or spans turned away with
  503 / UNAVAILABLE, or left in Kafka, in the last seconds), until ``grace`` after it caught up.
  Judging by what the store has would then fire alerts for payments that are fine, and run a
  diagnosis for each while the store is already the bottleneck. At most
  :data:`~.stall_hold.BEHIND_MAX_HOLD`: a collector behind for longer is under-provisioned, not
  catching up; its scan judges by the store again (with a warning) until intake caught up once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from hoptrace.contract import Cause, PipelineSpec, State

from . import metrics
from .lease import Lease
from .stall_hold import BEHIND_MAX_HOLD, BEHIND_WHY, GAP_WHY, HOLD_SQL, NO_TIME, alert_late

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
INSERT INTO alerts (correlation_id, pipeline, step, service)
SELECT u.correlation_id, u.pipeline, u.next_step, m.service
FROM upd u LEFT JOIN unnest($4::text[], $5::text[]) AS m(step, service) ON m.step = u.next_step
ON CONFLICT (correlation_id) WHERE status = 'firing' DO NOTHING
RETURNING id, correlation_id
"""


async def no_cause(correlation_id: str) -> tuple[str | None, str | None]:
    """Default cause hook: no diagnosis."""
    return None, None


#: Failed correlations updated since $1 without a firing alert: one alert each.
_FIRE_FAILED = """
INSERT INTO alerts (correlation_id, pipeline, step, kind, service)
SELECT c.correlation_id, c.pipeline, c.failed_step, 'failed', m.service
FROM correlations c LEFT JOIN unnest($3::text[], $4::text[]) AS m(step, service)
     ON m.step = c.failed_step
WHERE c.state = 'failed' AND c.updated_at >= $1
  AND NOT EXISTS (SELECT 1 FROM alerts a
                  WHERE a.correlation_id = c.correlation_id AND a.status = 'firing')
ORDER BY c.updated_at LIMIT $2
ON CONFLICT (correlation_id) WHERE status = 'firing' DO NOTHING
RETURNING id, correlation_id
"""
#: Failure alerts whose correlation is no longer failed (or gone): resolved.
_RESOLVE_FAILED = """
UPDATE alerts a SET status = 'resolved', resolved_at = now(), next_attempt_at = now()
WHERE a.status = 'firing' AND a.kind = 'failed'
  AND NOT EXISTS (SELECT 1 FROM correlations c
                  WHERE c.correlation_id = a.correlation_id AND c.state = 'failed')
"""
#: A correlation's ``updated_at`` is its writer's transaction start: a sweep looks back this far
#: before the previous one, so a transaction that began before it and committed after is seen.
SWEEP_OVERLAP = timedelta(seconds=60)
#: The causes of diagnosed alerts ($1 ids, $2 causes, $3 evidence), in one statement.
_DIAGNOSED = """
UPDATE alerts a SET cause = u.cause, evidence = u.evidence, diagnosed = true
FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, cause, evidence)
WHERE a.id = u.id
"""
#: Stuck correlations by (state, pipeline, step, cause): the cause is the firing alert's label
#: (as first sent), else its diagnosis, else $1 once the diagnosis gave none, else '' (pending).
_STUCK = """
SELECT c.state, coalesce(c.pipeline, '') AS pipeline, coalesce(c.next_step, '') AS step,
       coalesce(a.labels->>'cause', a.cause, CASE WHEN a.diagnosed THEN $1 END, '') AS cause,
       count(*) AS n
FROM correlations c
LEFT JOIN alerts a ON a.correlation_id = c.correlation_id AND a.status = 'firing'
WHERE c.state = 'stalled'
GROUP BY 1, 2, 3, 4
UNION ALL
SELECT c.state, coalesce(c.pipeline, '') AS pipeline, coalesce(c.failed_step, '') AS step,
       coalesce(a.labels->>'cause', a.cause, CASE WHEN a.diagnosed THEN $1 END, '') AS cause,
       count(*) AS n
FROM correlations c
LEFT JOIN alerts a ON a.correlation_id = c.correlation_id AND a.status = 'firing'
WHERE c.state = 'failed'
GROUP BY 1, 2, 3, 4
"""
#: (pipeline, step, cause) -> correlations, per state (stalled, failed).
Counts = tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], int]]


def step_services(spec: PipelineSpec | None) -> tuple[list[str], list[str]]:
    """(step ids, their services) of ``spec``: the service label of an alert at a step."""
    if spec is None:
        return [], []
    return [s.id for s in spec.steps], [s.service for s in spec.steps]


async def stuck_counts(conn: asyncpg.Connection | asyncpg.Pool) -> Counts:
    """Stalled and failed correlations by (pipeline, step, cause)."""
    stalled: dict[tuple[str, str, str], int] = {}
    failed: dict[tuple[str, str, str], int] = {}
    for r in await conn.fetch(_STUCK, Cause.MISSING_EVIDENCE.value):
        into = failed if r["state"] == State.FAILED else stalled
        into[(r["pipeline"], r["step"], r["cause"])] = r["n"]
    return stalled, failed


async def fire_failed(
    conn: asyncpg.Connection,
    since: datetime = NO_TIME,
    limit: int = 1000,
    spec: PipelineSpec | None = None,
) -> list[tuple[int, str]]:
    """One alert per failed correlation updated since ``since`` that has no firing alert (its
    service from ``spec``); returns (alert id, cid)."""
    rows = await conn.fetch(_FIRE_FAILED, since, limit, *step_services(spec))
    return [(r["id"], r["correlation_id"]) for r in rows]


async def resolve_recovered(conn: asyncpg.Connection) -> int:
    """Resolve the failure alerts of correlations no longer failed; returns how many."""
    status = await conn.execute(_RESOLVE_FAILED)
    return int(status.rsplit(" ", 1)[-1])


async def scan_once(
    conn: asyncpg.Connection,
    limit: int = 1000,
    hold_from: datetime = NO_TIME,
    hold_to: datetime = NO_TIME,
    spec: PipelineSpec | None = None,
) -> list[tuple[int, str]]:
    """One scan: mark overdue correlations stalled, fire their alerts (with their step's service
    from ``spec``); returns (alert id, cid). Deadlines in ``[hold_from, hold_to)`` are held (not
    judged by this scan)."""
    rows = await conn.fetch(SCAN_SQL, limit, hold_from, hold_to, *step_services(spec))
    return [(r["id"], r["correlation_id"]) for r in rows]


@dataclass(frozen=True, slots=True)
class _Pass:
    """What one scan did, applied to the scanner's memory once its transaction committed."""

    fired: list[tuple[int, str]]  # (alert id, cid) of the alerts fired
    report: bool  # refresh the stuck gauges (every fifth scan, and when alerts fired)
    failed_from: datetime  # the next sweep for failed correlations starts here
    hold_over: bool  # the held window was judged: the hold is over


class StallScanner:
    """The scan loop of one replica; scans only while it holds the lease. ``dsn`` is kept for
    callers and unused: the scan runs on ``pool``."""

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
        lease: float | None = None,
        diagnosis_flush: float = 1.0,
        behind: Callable[[], bool] | None = None,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.interval = interval
        self.cause_for = cause_for
        self.limit = limit
        self.cause_timeout = cause_timeout
        #: seconds between two writes of the causes of one scan's alerts
        self.diagnosis_flush = diagnosis_flush
        self.spec = spec
        self.grace = grace
        #: the lease expires this long after the last renewal (a renewal every ``interval``)
        self.lease = Lease(lease if lease is not None else max(3.0, 4 * interval))
        # the blind window being held ([from, to) of deadlines) and when the hold ends
        self.hold: tuple[datetime, datetime] | None = None
        self.hold_until: datetime | None = None
        self.hold_why = GAP_WHY
        #: is span intake behind now? (None: never; see the module doc)
        self.behind = behind
        self._overlong = False  # a hold for intake behind reached BEHIND_MAX_HOLD
        self._failed_from = NO_TIME  # failed correlations updated since then are swept
        self._diag: set[asyncio.Task[None]] = set()
        self.scans = 0

    @property
    def is_leader(self) -> bool:
        return self.lease.held

    def _lost(self) -> None:
        if self.lease.held:
            log.warning("stall scan leadership lost (another collector holds the lease)")
        self.lease.lost()
        metrics.SCAN_LEADER.set(0)
        metrics.clear_stuck()  # the leader reports them; ours would go stale

    async def _acquired(self, conn: asyncpg.Connection, beat: asyncpg.Record) -> None:
        """The lease was just taken (not renewed): hold the blind window of a gap, sweep every
        failed correlation once."""
        self.hold = self.hold_until = None
        self._failed_from = NO_TIME
        previous, now = beat["previous"], beat["now"]
        gap = previous is not None and now - previous > timedelta(seconds=2 * self.interval + 1)
        if gap and self.grace > 0 and self.spec is not None:
            self.hold_until = now + timedelta(seconds=self.grace)
            self.hold = (previous, self.hold_until)
            self.hold_why = GAP_WHY
            await conn.execute(HOLD_SQL, self.hold_until)
            log.info(
                "stall scan leadership acquired after %.1fs without a scanner: deadlines "
                "since %s are judged in %.1fs, once the spans held meanwhile have arrived",
                (now - previous).total_seconds(), previous.isoformat(), self.grace,
            )  # fmt: skip
        else:
            log.info("stall scan leadership acquired")

    async def tick(self) -> list[tuple[int, str]]:
        """Scan if this replica holds (or can take) the lease; returns the alerts fired."""
        t0 = time.perf_counter()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                beat = await self.lease.claim(conn)
                if beat is None:
                    self._lost()
                    return []
                if beat["was"] != self.lease.holder:
                    await self._acquired(conn, beat)
                metrics.SCAN_LEADER.set(1)
                done = await self._scan(conn, beat["now"])
        except asyncpg.LockNotAvailableError:  # the leader is in the middle of its scan
            self._lost()
            return []
        # committed: only now does this replica's memory move on with the store
        if done.hold_over:
            self.hold = self.hold_until = None
        self._failed_from = done.failed_from
        metrics.SCAN_SECONDS.observe(time.perf_counter() - t0)
        self.scans += 1
        fired = done.fired
        if fired:
            metrics.ALERTS_FIRED.inc(len(fired))
            task = asyncio.create_task(self._diagnose(fired))
            self._diag.add(task)
            task.add_done_callback(self._diag.discard)
        if done.report:
            await self._report_stuck()
        return fired

    async def _report_stuck(self) -> None:
        """The stuck gauges from the store (after the scan's transaction: the lease row is not
        held during the GROUP BY); kept as they were when the query fails."""
        try:
            stalled, failed = await stuck_counts(self.pool)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("stuck-correlation gauges not refreshed: %s", exc)
            return
        if self.lease.held:
            metrics.set_stuck(metrics.STALLED, stalled)
            metrics.set_stuck(metrics.FAILED, failed)

    async def _scan(self, conn: asyncpg.Connection, now: datetime) -> _Pass:
        """The scan proper, in the lease's transaction (see :class:`_Pass`)."""
        if self.behind is not None and self.grace > 0 and self.spec is not None:
            await self._hold_while_behind(conn, now)
        hold_from, hold_to = NO_TIME, NO_TIME
        hold_over = False
        if self.hold is not None:
            if self.hold_until is not None and datetime.now(UTC) < self.hold_until:
                hold_from, hold_to = self.hold
            else:  # the grace is over: judge the held window by span times, then scan it
                assert self.spec is not None
                late = await alert_late(
                    conn, self.spec, *self.hold, step_services(self.spec), self.hold_why
                )
                if late:
                    metrics.ALERTS_FIRED.inc(late)
                    log.info("%d step(s) were late %s: alerted", late, self.hold_why)
                await conn.execute(HOLD_SQL, None)
                hold_over = True
        # recovered failures first: a payment redelivered and stalled again may alert again
        await resolve_recovered(conn)
        fired = await scan_once(conn, self.limit, hold_from, hold_to, self.spec)
        failed = await fire_failed(conn, self._failed_from, self.limit, self.spec)
        # a full batch: the rest are swept from the same point next time
        failed_from = self._failed_from if len(failed) >= self.limit else now - SWEEP_OVERLAP
        fired += failed
        return _Pass(fired, self.scans % 5 == 0 or bool(fired), failed_from, hold_over)

    async def _hold_while_behind(self, conn: asyncpg.Connection, now: datetime) -> None:
        """While span intake is behind, hold the deadlines from one scan ago until ``grace``
        after it caught up (extending a hold already running), at most BEHIND_MAX_HOLD."""
        assert self.behind is not None
        if not self.behind():
            self._overlong = False
            return
        if self._overlong:
            return
        until = now + timedelta(seconds=self.grace)
        if self.hold is None:
            self.hold = (now - timedelta(seconds=self.interval), now)  # `until` is set below
            self.hold_why = BEHIND_WHY
            log.warning(
                "span intake is behind (the write queue is full, spans are turned away): "
                "deadlines are held until %.1fs after it caught up, then judged by span times",
                self.grace,
            )
        start = self.hold[0]
        if until - start > BEHIND_MAX_HOLD:
            until = max(self.hold[1], start + BEHIND_MAX_HOLD)
            self._overlong = True
            log.warning(
                "span intake has been behind for over %ds: deadlines are judged by the store "
                "again (stall alerts may include payments whose spans are still queued) "
                "until it catches up",
                BEHIND_MAX_HOLD.total_seconds(),
            )
        if until > self.hold[1]:
            self.hold = (start, until)
            self.hold_until = until
            await conn.execute(HOLD_SQL, until)

    async def _diagnose(self, fired: list[tuple[int, str]]) -> None:
        """Diagnose the alerts one scan fired (8 at a time) and record their causes together,
        at most ``diagnosis_flush`` seconds apart: the dispatcher then finds the alerts of one
        step and cause diagnosed at once and sends them as one group."""
        sem = asyncio.Semaphore(8)
        ready: list[tuple[int, str | None, str | None]] = []

        async def one(alert_id: int, cid: str) -> None:
            async with sem:
                try:
                    cause, evidence = await asyncio.wait_for(
                        self.cause_for(cid), self.cause_timeout
                    )
                except Exception as exc:  # a broken diagnosis never blocks the alert
                    log.warning("cause_for(%s) failed: %s", cid, exc)
                    cause, evidence = None, None
                ready.append((alert_id, cause, evidence))

        pending = {asyncio.create_task(one(a, c)) for a, c in fired}
        try:
            while pending or ready:
                if pending:
                    _, pending = await asyncio.wait(pending, timeout=self.diagnosis_flush)
                batch, ready[:] = list(ready), []
                if batch:
                    await self._record_causes(batch)
        finally:
            for t in pending:
                t.cancel()

    async def _record_causes(self, batch: list[tuple[int, str | None, str | None]]) -> None:
        try:
            await self.pool.execute(
                _DIAGNOSED, [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:  # sent undiagnosed
            log.warning("causes of %d alert(s) not recorded: %s", len(batch), exc)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the lease runs out by itself if this goes on
                log.warning("stall scan failed: %s", exc)
                self._lost()
            await asyncio.sleep(self.interval)

    async def release(self) -> None:
        """Give the lease up (another replica takes over at its next scan) and stop diagnosing."""
        held = self.lease.held
        self.lease.lost()
        metrics.SCAN_LEADER.set(0)
        metrics.clear_stuck()
        if held:
            try:
                await asyncio.wait_for(self.lease.release(self.pool), 2)
            except Exception as exc:  # it expires by itself
                log.warning("stall scan lease not released (it expires in %.1fs): %s",
                            self.lease.ttl, exc)  # fmt: skip
        for t in list(self._diag):
            t.cancel()

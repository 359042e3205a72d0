"""Held deadlines: the deadlines the stall scan does not judge for a while, and how they are judged
afterwards.

The scan holds the deadlines of a window when the store cannot yet know whether they were met:

- a gap without scans (no collector was scanning, so the SDKs held their spans meanwhile): the
  deadlines from the last scan until the grace after the takeover;
- span intake that is behind (the write queue full, spans turned away): the deadlines from one
  scan before it fell behind until the grace after it caught up, at most
  :data:`BEHIND_MAX_HOLD`.

When the hold ends, :func:`alert_late` judges the window by span times: a step done on time gets
no alert, one done after its deadline gets one alert, fired at the deadline and resolved at the
step's end; one still not done is left to the scan, which fires it as stalled.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from hoptrace.contract import PipelineSpec

from .decode import us_to_dt

#: No deadline is held.
NO_TIME = datetime(1, 1, 1, tzinfo=UTC)
#: What a hold's late-step alerts say about when their deadline passed.
GAP_WHY = "while no collector was scanning"
BEHIND_WHY = "while span intake was behind"
#: The longest a hold for intake that is behind may last (from its first held deadline).
BEHIND_MAX_HOLD = timedelta(seconds=120)
#: The hold, for the API and other replicas to see (NULL: nothing held).
HOLD_SQL = "UPDATE stall_scan SET hold_until = $1 WHERE id = 1"
_MOVED = """
SELECT c.correlation_id, c.pipeline, c.steps::text AS steps,
       coalesce(array_agg(a.step) FILTER (WHERE a.step IS NOT NULL), '{}') AS alerted
FROM correlations c LEFT JOIN alerts a ON a.correlation_id = c.correlation_id
WHERE c.updated_at >= $1 AND c.pipeline = $2
GROUP BY c.correlation_id
"""
_LATE = """
INSERT INTO alerts (correlation_id, pipeline, step, status, fired_at, resolved_at, evidence,
                    diagnosed, service)
SELECT u.cid, $1, u.step, 'resolved', u.due, u.done, u.evidence, true, m.service
FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[])
     AS u(cid, step, due, done, evidence)
LEFT JOIN unnest($7::text[], $8::text[]) AS m(step, service) ON m.step = u.step
"""


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
    conn: asyncpg.Connection,
    spec: PipelineSpec,
    since: datetime,
    until: datetime,
    services: tuple[list[str], list[str]],
    why: str = GAP_WHY,
) -> int:
    """One resolved alert (fired at the deadline, resolved when the step got done) per step of
    a correlation that moved on since ``since`` and was late for a deadline in ``[since, until)``
    without an alert for that step (``services``: the spec's step ids and their services, the
    alerts' service label); returns the number inserted."""
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
                cols, (step, due, done, f"{step} done {late:.1f}s after its deadline, {why} "
                       "(judged from span times)"), strict=True
            ):  # fmt: skip
                col.append(value)  # type: ignore[arg-type]
    if cids:
        await conn.execute(_LATE, spec.name, cids, *cols, *services)
    return len(cids)

"""Step runs of services hoptrace did not write, completed from the store before they are folded.

A batch's foreign runs (``state.foreign_runs``) may lack what only other spans can tell:

* **a failure below them**: a span under the run (a DB or HTTP client span) that failed and was
  stored with an earlier batch — children end before their parent, so their exporter sends them
  first. Looked up among the stored spans of the runs' traces (the primary key starts with the
  trace id).
* **their correlation id**: a span without a carrier (e.g. a Java consumer span, which carries
  no baggage) belongs to the correlation of its trace, named by any other span of the trace: the
  producer span upstream, usually. When no stored span of the trace names one yet, the run is
  parked in ``pending_steps`` and folded when one arrives (``unpark``, run with every batch while
  runs are parked). A run parked longer than ``PARK_FOR`` is dropped (counted): its trace never
  named a correlation.

Runs in the spans of one batch go to the store in the same transaction as the batch (the spans
are already inserted when this runs, so the batch's own spans count too).
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import timedelta

import asyncpg

from hoptrace.contract.conventions import EXCEPTION_EVENT, EXCEPTION_MESSAGE, EXCEPTION_TYPE

from . import metrics
from .state import Run, StepObs

#: How long a run waits for its trace to name a correlation before it is dropped.
PARK_FOR = timedelta(hours=1)

PENDING_DDL = """
CREATE TABLE IF NOT EXISTS pending_steps (
    trace_id   text COLLATE "C" NOT NULL,
    span_id    text COLLATE "C" NOT NULL,
    step       text NOT NULL,
    start_us   bigint NOT NULL,
    end_us     bigint NOT NULL,
    run_failed boolean NOT NULL,
    run_error  text,
    run_outcome text,  -- one of hoptrace's own runs: the outcome it reported
    parked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trace_id, span_id)
);
"""

#: The failed spans right below runs, with their first exception event's attributes (an agent
#: may leave the status message empty and say why only there: the Java agent's JDBC spans).
_FAILED_BELOW = """
SELECT trace_id, parent_span_id, name, status_message,
       (SELECT e->'attributes' FROM jsonb_array_elements(events) AS e
        WHERE e->>'name' = $3 LIMIT 1) AS exc_attrs
FROM spans
WHERE trace_id = ANY($1::text[]) AND status_code = 2 AND parent_span_id = ANY($2::text[])
"""
_TRACE_CIDS = """
SELECT DISTINCT ON (trace_id) trace_id, correlation_id FROM spans
WHERE trace_id = ANY($1::text[]) AND correlation_id IS NOT NULL
ORDER BY trace_id, start_time
"""
_PARK = """
INSERT INTO pending_steps (trace_id, span_id, step, start_us, end_us, run_failed, run_error,
                           run_outcome)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::boolean[], $7::text[], $8::text[])
ON CONFLICT (trace_id, span_id) DO NOTHING
"""
_ANY_PARKED = "SELECT EXISTS (SELECT 1 FROM pending_steps)"
_UNPARK = """
WITH found AS (
    SELECT p.trace_id, p.span_id, c.correlation_id
    FROM pending_steps p
    CROSS JOIN LATERAL (
        SELECT s.correlation_id FROM spans s
        WHERE s.trace_id = p.trace_id AND s.correlation_id IS NOT NULL
        ORDER BY s.start_time LIMIT 1
    ) c
    ORDER BY p.trace_id, p.span_id
    LIMIT $1
    FOR UPDATE OF p SKIP LOCKED
)
DELETE FROM pending_steps p USING found f
WHERE p.trace_id = f.trace_id AND p.span_id = f.span_id
RETURNING p.trace_id, p.span_id, p.step, p.start_us, p.end_us, p.run_failed, p.run_error,
          p.run_outcome, f.correlation_id
"""
_EXPIRE = "DELETE FROM pending_steps WHERE parked_at < now() - $1::interval"
#: Parked runs folded per batch at most.
UNPARK_LIMIT = 5000


def _by_cid(pairs: list[tuple[str, StepObs]]) -> dict[str, list[StepObs]]:
    out: dict[str, list[StepObs]] = defaultdict(list)
    for cid, obs in pairs:
        out[cid].append(obs)
    return dict(out)


async def settle(conn: asyncpg.Connection, runs: list[Run]) -> dict[str, list[StepObs]]:
    """The runs' observations by correlation id, each with the failures stored below it (the
    batch's own spans included) and its correlation id found through its trace; runs whose trace
    names none yet are parked."""
    # hoptrace's own runs report their outcome: a span below them does not change it
    below = [r for r in runs if r.outcome is None and (not r.failed or r.failed_below)]
    if below:
        rows = await conn.fetch(
            _FAILED_BELOW,
            list({r.trace_id for r in below}),
            list({r.span_id for r in below}),
            EXCEPTION_EVENT,
        )
        failed = {(r["trace_id"], r["parent_span_id"]): r for r in rows}
        if failed:
            runs = [_with_failure(r, failed.get((r.trace_id, r.span_id))) for r in runs]
    unknown = list({r.trace_id for r in runs if r.correlation_id is None})
    cids: dict[str, str] = {}
    if unknown:
        cids = {r["trace_id"]: r["correlation_id"] for r in await conn.fetch(_TRACE_CIDS, unknown)}
    out: list[tuple[str, StepObs]] = []
    parked: list[Run] = []
    for r in runs:
        cid = r.correlation_id or cids.get(r.trace_id)
        if cid is None:
            parked.append(r)
        else:
            out.append((cid, r.obs(cid)))
    if parked:
        await conn.execute(
            _PARK,
            [r.trace_id for r in parked],
            [r.span_id for r in parked],
            [r.step for r in parked],
            [r.start_us for r in parked],
            [r.end_us for r in parked],
            [r.failed for r in parked],
            [r.error for r in parked],
            [r.outcome for r in parked],
        )
        metrics.RUNS_PARKED.inc(len(parked))
    return _by_cid(out)


def _with_failure(run: Run, failed: asyncpg.Record | None) -> Run:
    """``run`` failed through the stored span ``failed`` below it, said as ``name: why`` (its
    status message, else its exception's type and message). A run that failed through a span of
    its batch keeps that row's text unless the stored span says why."""
    if failed is None or (run.failed and not run.failed_below):
        return run
    why = failed["status_message"] or _exception_text(failed["exc_attrs"])
    if run.failed and not why:
        return run
    what = f"{failed['name']}: {why}" if why else failed["name"]
    return run._replace(failed=True, error=what, failed_below=True)


def _exception_text(raw: str | dict[str, object] | None) -> str | None:
    """``type: message`` of an exception event's attributes (jsonb, as text or decoded), or
    None."""
    attrs = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(attrs, dict):
        return None
    etype, message = attrs.get(EXCEPTION_TYPE), attrs.get(EXCEPTION_MESSAGE)
    if not etype and not message:
        return None
    return f"{etype}: {message}" if etype and message else str(etype or message)


async def unpark(conn: asyncpg.Connection) -> dict[str, list[StepObs]]:
    """Parked runs whose trace names a correlation now, by correlation id (taken out of
    ``pending_steps``); runs parked longer than ``PARK_FOR`` are dropped."""
    if not await conn.fetchval(_ANY_PARKED):
        return {}
    rows = await conn.fetch(_UNPARK, UNPARK_LIMIT)
    expired = await conn.execute(_EXPIRE, PARK_FOR)
    dropped = int(expired.rsplit(" ", 1)[-1])
    if dropped:
        metrics.RUNS_DROPPED.inc(dropped)
    out = [
        (
            r["correlation_id"],
            Run(
                r["trace_id"],
                r["span_id"],
                r["step"],
                r["start_us"],
                r["end_us"],
                r["run_failed"],
                r["run_error"],
                r["correlation_id"],
                outcome=r["run_outcome"],
            ).obs(r["correlation_id"]),
        )
        for r in rows
    ]
    return _by_cid(out)

"""The span store's read API (used by the diagnosis, the CLI and the dashboard). Typed, bounded.

Every function takes an ``asyncpg`` pool (or connection) to the store database, e.g. from
:func:`connect` (any asyncpg pool works: jsonb values are decoded whether or not a codec is set).
Times are timezone-aware UTC datetimes; durations are ``timedelta`` or float seconds as named.
Functions that need step order take an optional ``spec`` (default: the configured pipeline).
"""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from hoptrace.contract import Outcome, PipelineSpec, State, load_spec
from hoptrace.settings import get_settings

from .records import SpanRecord

Pool = asyncpg.Pool | asyncpg.Connection
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StepProgress:
    """A step's executions within one correlation (from ``correlations.steps``)."""

    step: str
    first_start: datetime | None
    last_end: datetime | None
    done_at: datetime | None  # earliest successful end; None = not done
    outcome: str | None  # ok | duplicate | error (best seen)
    count: int
    ok: int
    duplicate: int
    error: int
    last_error: str | None

    @property
    def done(self) -> bool:
        return self.done_at is not None


@dataclass(frozen=True, slots=True)
class CorrelationRow:
    """Progress of one correlation id. ``state``: in_progress | completed | failed | stalled."""

    correlation_id: str
    pipeline: str | None
    state: str
    last_step: str | None
    last_step_index: int | None
    last_step_at: datetime | None
    failed_step: str | None
    failed_at: datetime | None
    error: str | None
    next_step: str | None
    next_deadline: datetime | None
    first_seen: datetime
    updated_at: datetime
    completed_at: datetime | None
    steps: dict[str, StepProgress]


@dataclass(frozen=True, slots=True)
class StallRow:
    """A stuck correlation. ``state`` stalled: ``step`` is the overdue step, ``since`` its
    deadline; ``state`` failed: ``step`` is the step that errored for good (e.g. dead-lettered),
    ``since`` when, ``error`` its last error. ``overdue_by``: now - ``since``."""

    correlation_id: str
    pipeline: str | None
    step: str | None
    last_step: str | None
    last_step_at: datetime | None
    since: datetime
    overdue_by: timedelta
    state: str = State.STALLED.value
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: int
    correlation_id: str
    pipeline: str | None
    step: str | None
    status: str  # firing | resolved
    fired_at: datetime
    resolved_at: datetime | None
    cause: str | None
    evidence: str | None
    delivered_firing: bool
    delivered_resolved: bool
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class HopLatency:
    """Latency samples (seconds) of one step measured from the previous step's completion (the
    first step: from its own start). Percentiles are None when there are no samples."""

    step: str
    samples: list[float]

    def percentile(self, q: float) -> float | None:
        if not self.samples:
            return None
        if len(self.samples) == 1:
            return self.samples[0]
        return statistics.quantiles(self.samples, n=100, method="inclusive")[int(q) - 1]

    @property
    def p50(self) -> float | None:
        return self.percentile(50)

    @property
    def p95(self) -> float | None:
        return self.percentile(95)

    @property
    def p99(self) -> float | None:
        return self.percentile(99)


async def connect(dsn: str | None = None, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    """A pool on the store (default: ``HOPTRACE_DATABASE_URL``)."""
    return await asyncpg.create_pool(
        dsn or get_settings().database_url, min_size=min_size, max_size=max_size
    )


def _spec(spec: PipelineSpec | None) -> PipelineSpec:
    return spec if spec is not None else load_spec(get_settings().pipeline)


def _j(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _dt(value: str | int | None) -> datetime | None:
    """A stored step time: integer microseconds since the epoch (or an ISO string)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return _EPOCH + timedelta(microseconds=int(value))
    return datetime.fromisoformat(value)


_SPAN_COLS = (
    "trace_id, span_id, parent_span_id, name, service, kind, start_time, end_time, duration_us, "
    "status_code, status_message, correlation_id, pipeline, step, outcome, attributes, events, "
    "received_at, resource, scope"
)


def _span(r: asyncpg.Record) -> SpanRecord:
    d = dict(r)
    d["attributes"] = _j(d["attributes"]) or {}
    d["events"] = _j(d["events"]) or []
    d["resource"] = _j(d["resource"]) or {}
    return SpanRecord(**d)


#: The spans of a correlation: those carrying its id, then the spans of their traces that carry
#: none (a service that does not carry the id: its spans belong to the correlation of their trace;
#: each trace probed through the primary key, which starts with ``trace_id``). One round trip.
_SPANS_FOR_CORRELATION = f"""
WITH own AS MATERIALIZED (
    SELECT {_SPAN_COLS} FROM spans WHERE correlation_id = $1 ORDER BY start_time LIMIT $2
)
SELECT * FROM (
    SELECT * FROM own
    UNION ALL
    SELECT t.* FROM (SELECT DISTINCT trace_id FROM own) AS traces,
        LATERAL (SELECT {_SPAN_COLS} FROM spans
                 WHERE spans.trace_id = traces.trace_id AND spans.correlation_id IS NULL
                 LIMIT $2) AS t
) AS found ORDER BY start_time LIMIT $2
"""  # noqa: S608 - built from constants only


async def spans_for_correlation(pool: Pool, cid: str, limit: int = 5000) -> list[SpanRecord]:
    """The spans of correlation ``cid``, by start time (at most ``limit``): those carrying
    ``hoptrace.correlation_id = cid`` and the spans without a correlation id of their traces."""
    rows = await pool.fetch(_SPANS_FOR_CORRELATION, cid, limit)
    return [_span(r) for r in rows]


async def spans_for_trace(pool: Pool, trace_id: str, limit: int = 5000) -> list[SpanRecord]:
    """Spans of one trace (32-hex id), by start time (at most ``limit``)."""
    rows = await pool.fetch(
        f"SELECT {_SPAN_COLS} FROM spans WHERE trace_id = $1 ORDER BY start_time LIMIT $2",  # noqa: S608
        trace_id.lower(),
        limit,
    )
    return [_span(r) for r in rows]


def _steps(raw: Any) -> dict[str, StepProgress]:
    out: dict[str, StepProgress] = {}
    for sid, s in (_j(raw) or {}).items():
        out[sid] = StepProgress(
            step=sid,
            first_start=_dt(s.get("first_start")),
            last_end=_dt(s.get("last_end")),
            done_at=_dt(s.get("done_at")),
            outcome=s.get("outcome"),
            count=int(s.get("count", 0)),
            ok=int(s.get(Outcome.OK.value, 0)),
            duplicate=int(s.get(Outcome.DUPLICATE.value, 0)),
            error=int(s.get(Outcome.ERROR.value, 0)),
            last_error=s.get("last_error"),
        )
    return out


async def correlation(pool: Pool, cid: str) -> CorrelationRow | None:
    """The progress row of one correlation id, or None if no step span was seen for it."""
    r = await pool.fetchrow("SELECT * FROM correlations WHERE correlation_id = $1", cid)
    if r is None:
        return None
    d = dict(r)
    d.pop("done_mask", None)  # an index helper (see schema); ``steps`` says the same
    d["steps"] = _steps(d["steps"])
    return CorrelationRow(**d)


_STALLED = """
SELECT correlation_id, pipeline, state, next_step AS step, last_step, last_step_at,
       next_deadline AS since, NULL::text AS last_error
FROM correlations WHERE state = 'stalled' ORDER BY next_deadline LIMIT $1
"""
_STUCK = f"""
SELECT *, now() - since AS overdue_by FROM (
    ({_STALLED})
    UNION ALL
    (SELECT correlation_id, pipeline, state, failed_step, last_step, last_step_at,
            coalesce(failed_at, updated_at), error
     FROM correlations WHERE state = 'failed' ORDER BY coalesce(failed_at, updated_at) LIMIT $1)
) stuck ORDER BY since LIMIT $1
"""  # noqa: S608 - constants


_STALLED_ONLY = f"SELECT *, now() - since AS overdue_by FROM ({_STALLED}) s ORDER BY since"  # noqa: S608


async def stalled(pool: Pool, limit: int = 100, *, failed: bool = False) -> list[StallRow]:
    """Stalled correlations, longest overdue first (at most ``limit``); with ``failed``, the
    failed ones too (stuck since their step failed), all longest stuck first."""
    if failed:
        rows = await pool.fetch(_STUCK, limit)
    else:
        rows = await pool.fetch(_STALLED_ONLY, limit)
    return [
        StallRow(
            correlation_id=r["correlation_id"],
            pipeline=r["pipeline"],
            step=r["step"],
            last_step=r["last_step"],
            last_step_at=r["last_step_at"],
            since=r["since"],
            overdue_by=r["overdue_by"],
            state=r["state"],
            error=r["last_error"],
        )
        for r in rows
    ]


_ALERT_COLS = (
    "id, correlation_id, pipeline, step, status, fired_at, resolved_at, cause, evidence, "
    "delivered_firing, delivered_resolved, attempts, last_error"
)
_ALERTS_ALL = f"SELECT {_ALERT_COLS} FROM alerts ORDER BY fired_at DESC, id DESC LIMIT $1"  # noqa: S608
_ALERTS_BY_STATUS = (
    f"SELECT {_ALERT_COLS} FROM alerts WHERE status = $1 "  # noqa: S608
    "ORDER BY fired_at DESC, id DESC LIMIT $2"
)
_ALERTS_FOR_CID = f"SELECT {_ALERT_COLS} FROM alerts WHERE correlation_id = $1 ORDER BY id"  # noqa: S608


async def alerts(pool: Pool, status: str | None = None, limit: int = 200) -> list[AlertRow]:
    """Alerts, newest first; ``status`` filters on firing|resolved."""
    if status is None:
        rows = await pool.fetch(_ALERTS_ALL, limit)
    else:
        rows = await pool.fetch(_ALERTS_BY_STATUS, status, limit)
    return [AlertRow(**dict(r)) for r in rows]


async def alerts_for_correlation(pool: Pool, cid: str) -> list[AlertRow]:
    """Every alert of one correlation, oldest first."""
    return [AlertRow(**dict(r)) for r in await pool.fetch(_ALERTS_FOR_CID, cid)]


async def state_counts(pool: Pool, since: datetime) -> dict[str, int]:
    """Correlations first seen at or after ``since``, counted by state (all four keys present)."""
    out = {s.value: 0 for s in (State.IN_PROGRESS, State.COMPLETED, State.FAILED, State.STALLED)}
    for r in await pool.fetch(
        "SELECT state, count(*)::int AS n FROM correlations WHERE first_seen >= $1 GROUP BY state",
        since,
    ):
        out[r["state"]] = r["n"]
    return out


async def funnel(pool: Pool, since: datetime, spec: PipelineSpec | None = None) -> dict[str, int]:
    """For correlations first seen at or after ``since``: how many got each step done, in spec
    order (every spec step present)."""
    spec = _spec(spec)
    ids = [s.id for s in spec.steps]
    counts = dict.fromkeys(ids, 0)
    unfilled = False
    # index-only scan: one group per distinct set of done steps (bit i = spec step i done)
    for r in await pool.fetch(_FUNNEL_MASKS, since):
        mask, n = r["done_mask"], r["n"]
        if mask is None:  # stored before done_mask existed and not migrated yet
            unfilled = True
            continue
        for i, sid in enumerate(ids):
            if mask >> i & 1:
                counts[sid] += n
    if unfilled:
        for r in await pool.fetch(_FUNNEL_STEPS, since):
            if r["step"] in counts:
                counts[r["step"]] += r["n"]
    return counts


_FUNNEL_MASKS = (
    "SELECT done_mask, count(*)::int AS n FROM correlations WHERE first_seen >= $1 "
    "GROUP BY done_mask"
)
_FUNNEL_STEPS = (
    "SELECT s.key AS step, count(*)::int AS n FROM correlations c, jsonb_each(c.steps) s "
    "WHERE c.first_seen >= $1 AND c.done_mask IS NULL "
    "AND jsonb_typeof(s.value->'done_at') IN ('number', 'string') GROUP BY s.key"
)


async def hop_latencies(
    pool: Pool, since: datetime, limit: int = 10_000, spec: PipelineSpec | None = None
) -> dict[str, HopLatency]:
    """Per step, latency samples from the previous step's completion to this step's completion
    (first step: its own duration), over the ``limit`` most recent correlations first seen at or
    after ``since``. Keys in spec order."""
    spec = _spec(spec)
    ids = [s.id for s in spec.steps]
    if not ids:
        return {}
    # the step times come out of the steps jsonb in SQL (no JSON or date parsing per row here)
    rows = await pool.fetch(_hop_times_sql(len(ids)), since, limit, ids)
    out = {sid: HopLatency(sid, []) for sid in ids}
    first = out[ids[0]].samples
    later = [out[sid].samples for sid in ids[1:]]
    for r in rows:
        done = r["done_us"]
        d0 = done[0]
        if d0 is not None and r["start"] is not None:
            first.append(max(0.0, (d0 - r["start"]) / 1e6))
        prev = d0
        for samples, d in zip(later, done[1:], strict=True):
            if d is not None and prev is not None:
                samples.append(max(0.0, (d - prev) / 1e6))
            prev = d
    return out


def _us_sql(value: str) -> str:
    """SQL: a stored step time (integer microseconds since the epoch, or an ISO string) as
    float8 microseconds since the epoch; NULL when absent."""
    return (
        f"(CASE jsonb_typeof({value}) WHEN 'number' THEN ({value})::float8 "
        f"WHEN 'string' THEN CASE WHEN {value} #>> '{{}}' <> '' THEN "
        f"(extract(epoch FROM ({value} #>> '{{}}')::timestamptz) * 1000000)::float8 END END)"
    )


@functools.lru_cache(maxsize=8)
def _hop_times_sql(n: int) -> str:
    """Per correlation (most recent first): the done times of the ``n`` steps named by $3, and
    the first step's first start (each jsonb value extracted once, in the lateral)."""
    cols = ", ".join(f"c.steps -> ($3::text[])[{i + 1}] -> 'done_at' AS d{i}" for i in range(n))
    done = ", ".join(_us_sql(f"j.d{i}") for i in range(n))
    return f"""
SELECT ARRAY[{done}] AS done_us, {_us_sql("j.s0")} AS start
FROM (SELECT steps FROM correlations WHERE first_seen >= $1 ORDER BY first_seen DESC LIMIT $2) c,
     LATERAL (SELECT {cols}, c.steps -> ($3::text[])[1] -> 'first_start' AS s0 OFFSET 0) j
"""  # noqa: S608 - built from constants and a count only


__all__ = [
    "AlertRow",
    "CorrelationRow",
    "HopLatency",
    "Pool",
    "SpanRecord",
    "StallRow",
    "StepProgress",
    "alerts",
    "alerts_for_correlation",
    "connect",
    "correlation",
    "funnel",
    "hop_latencies",
    "spans_for_correlation",
    "spans_for_trace",
    "stalled",
    "state_counts",
]

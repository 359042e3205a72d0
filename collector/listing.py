"""List queries of the read API and the dashboard's Payments page: correlations newest first with
filters and keyset pagination, and the stalled count per step (the pipeline map).

Where a correlation *is*: the step it failed at (``failed_step``) or the step due next
(``next_step``, in progress and stalled); a completed one is at no step. Its *cause*: the cause
the stall scan's diagnosis gave its latest alert (stalled and failed correlations alert; the
``correlations`` table has no cause column), found through ``alerts_correlation_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hoptrace.contract import PipelineSpec, State

from .api_query import encode_cursor, parse_list_query
from .store import Pool


@dataclass(frozen=True, slots=True)
class ListedCorrelation:
    """One correlation in a list. ``step``: where it is (None once completed, or before any step
    is done). ``cause``: the cause diagnosed for its latest alert (None: it never alerted, or
    the diagnosis has not answered yet)."""

    correlation_id: str
    pipeline: str | None
    state: str
    step: str | None
    cause: str | None
    last_step: str | None
    last_step_at: datetime | None
    next_deadline: datetime | None
    failed_at: datetime | None
    error: str | None
    first_seen: datetime
    updated_at: datetime
    completed_at: datetime | None


#: The latest alert of each listed row (its cause is the row's ``cause``).
_LATEST_ALERT = (
    "LEFT JOIN LATERAL (SELECT a.cause FROM alerts a WHERE a.correlation_id = c.correlation_id "
    "ORDER BY a.id DESC LIMIT 1) la ON true"
)
_WHERE_IT_IS = "coalesce(c.failed_step, c.next_step)"
_COLS = (
    f"c.correlation_id, c.pipeline, c.state, {_WHERE_IT_IS} AS step, la.cause, c.last_step, "
    "c.last_step_at, c.next_deadline, c.failed_at, c.error, c.first_seen, c.updated_at, "
    "c.completed_at"
)


async def list_correlations(
    pool: Pool,
    *,
    states: Sequence[str] = (),
    steps: Sequence[str] = (),
    cause: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> list[ListedCorrelation]:
    """Correlations newest first (``first_seen``, then ``correlation_id``, both descending), at
    most ``limit``. Filters (each optional, all must hold): ``states`` (any of); ``steps`` (where
    it is, any of); ``cause`` (of its latest alert); first seen at or after ``since`` and before
    ``until``. ``after``: (first_seen, correlation_id) of the previous page's last row (keyset
    pagination: rows inserted meanwhile neither shift nor repeat the later pages)."""
    conds: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if states:
        conds.append(f"c.state = ANY({arg(list(states))}::text[])")
    if steps:
        conds.append(f"{_WHERE_IT_IS} = ANY({arg(list(steps))}::text[])")
    if since is not None:
        conds.append(f"c.first_seen >= {arg(since)}")
    if until is not None:
        conds.append(f"c.first_seen < {arg(until)}")
    if after is not None:
        conds.append(f"(c.first_seen, c.correlation_id) < ({arg(after[0])}, {arg(after[1])})")
    if cause is not None:
        # the correlations that ever alerted with this cause first (a hash semi-join over the
        # alerts, which are few), then the latest alert's cause must be it
        ref = arg(cause)
        conds.append(
            f"c.correlation_id IN (SELECT a.correlation_id FROM alerts a WHERE a.cause = {ref})"  # noqa: S608 - a placeholder
        )
        conds.append(f"la.cause = {ref}")
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    sql = (
        f"SELECT {_COLS} FROM correlations c {_LATEST_ALERT} {where} "  # noqa: S608 - constants
        f"ORDER BY c.first_seen DESC, c.correlation_id DESC LIMIT {arg(limit)}"
    )
    return [ListedCorrelation(**dict(r)) for r in await pool.fetch(sql, *args)]


async def stalled_counts(pool: Pool) -> dict[str, int]:
    """Stalled correlations now, counted by the step they wait on."""
    rows = await pool.fetch(
        "SELECT next_step AS step, count(*)::int AS n FROM correlations "
        "WHERE state = $1 AND next_step IS NOT NULL GROUP BY next_step",
        State.STALLED.value,
    )
    return {r["step"]: r["n"] for r in rows}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def listed_json(row: ListedCorrelation, services: Mapping[str, str]) -> dict[str, Any]:
    """One row of ``GET /api/v1/correlations``; ``services``: step id -> service (the spec)."""
    return {
        "correlation_id": row.correlation_id,
        "pipeline": row.pipeline,
        "state": row.state,
        "step": row.step,
        "service": services.get(row.step) if row.step else None,
        "cause": row.cause,
        "last_step": row.last_step,
        "last_step_at": _iso(row.last_step_at),
        "next_deadline": _iso(row.next_deadline),
        "failed_at": _iso(row.failed_at),
        "last_error": row.error,
        "first_seen": _iso(row.first_seen),
        "updated_at": _iso(row.updated_at),
        "completed_at": _iso(row.completed_at),
    }


async def page(
    pool: Pool, spec: PipelineSpec, params: Mapping[str, str], now: datetime | None = None
) -> dict[str, Any]:
    """``GET /api/v1/correlations``'s answer for its query ``params`` (checked by
    ``api_query.parse_list_query``: ``BadQuery`` for a bad one): ``items`` and ``next_cursor``
    (None on the last page)."""
    q = parse_list_query(params, spec, now)
    rows: list[ListedCorrelation] = []
    if not q.nothing:
        rows = await list_correlations(
            pool,
            states=q.states,
            steps=q.steps,
            cause=q.cause,
            since=q.since,
            until=q.until,
            after=q.after,
            limit=q.limit + 1,  # one more: is there a next page?
        )
    shown = rows[: q.limit]
    services = {s.id: s.service for s in spec.steps}
    last = shown[-1] if len(rows) > q.limit else None
    return {
        "items": [listed_json(r, services) for r in shown],
        "next_cursor": encode_cursor(last.first_seen, last.correlation_id) if last else None,
    }


__all__ = ["ListedCorrelation", "list_correlations", "listed_json", "page", "stalled_counts"]

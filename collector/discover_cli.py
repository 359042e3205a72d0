"""``hoptrace spec discover [--since 1h] [--limit N]``: the read side of spec discovery.

Two bounded queries, SELECT only (the read-only role is enough):

1. **the runs**: of the window's spans, at most ``limit`` are looked at (the first the scan meets,
   PostgreSQL's storage order, roughly oldest first; no index on start time exists, so the scan
   of the window's daily partitions also passes over that day's earlier rows); the traces holding
   a consumer, producer or hoptrace step span among them;
2. **their traces**: at most ``limit`` spans of those traces in the window (a primary-key lookup
   per trace, ordered by trace so that at most one trace is cut), with the attributes discovery
   reads (messaging, hoptrace's, database) and ids and times for the others.

The pure core (``discover``) proposes the spec; its TOML (``discover_toml``) goes to stdout, notes to stderr. Exit 0,
2 for bad input, 1 when nothing was found or the store could not be read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import typer

from hoptrace.contract import parse_duration
from hoptrace.contract.conventions import (
    ATTR_CORRELATION_ID,
    ATTR_EVENT_TYPE,
    ATTR_OUTCOME,
    ATTR_PIPELINE,
    ATTR_STEP,
    DESTINATION_KEYS,
    EMIT_TOPIC_KEYS,
    GROUP_KEYS,
    MESSAGE_KEY_KEYS,
    OPERATION_KEYS,
    RESOURCE_DISTRO_NAME,
    SpanKind,
)
from hoptrace.settings import get_settings

from .discover import MARGIN, discover, span_of
from .discover_runs import DB_KEYS
from .discover_toml import render

#: Span attributes the second query returns (every other attribute is left in the store).
KEYS = (
    DESTINATION_KEYS
    + GROUP_KEYS
    + OPERATION_KEYS
    + MESSAGE_KEY_KEYS
    + EMIT_TOPIC_KEYS
    + (ATTR_STEP, ATTR_PIPELINE, ATTR_OUTCOME, ATTR_EVENT_TYPE, ATTR_CORRELATION_ID)
    + DB_KEYS
)
_MESSAGING_KINDS = [int(SpanKind.PRODUCER), int(SpanKind.CONSUMER)]
_READ_KINDS = [int(SpanKind.CLIENT), *_MESSAGING_KINDS]

RUN_TRACES_SQL = """
SELECT count(*) AS looked, min(w.start_time) AS first, max(w.start_time) AS last,
       coalesce(array_agg(DISTINCT w.trace_id) FILTER (
           WHERE w.kind = ANY($3::smallint[]) OR w.step IS NOT NULL OR w.attributes ?| $4::text[]
       ), '{}') AS traces
FROM (SELECT trace_id, kind, step, attributes, start_time FROM spans
      WHERE start_time >= now() - $1::interval LIMIT $2) AS w
"""

TRACE_SPANS_SQL = """
SELECT trace_id, span_id, parent_span_id, name, service, kind, start_time, end_time, status_code,
       correlation_id, pipeline, step, outcome,
       CASE WHEN kind = ANY($4::smallint[]) OR step IS NOT NULL OR attributes ?| $5::text[] THEN
           (SELECT jsonb_object_agg(key, value) FROM jsonb_each(attributes)
            WHERE key = ANY($5::text[]))
       END AS attributes,
       resource ->> $6 AS distro
FROM spans
WHERE trace_id = ANY($1::text[]) AND start_time >= now() - $2::interval
ORDER BY trace_id
LIMIT $3
"""


@dataclass(frozen=True, slots=True)
class Read:
    """What the two queries returned, and how much they looked at."""

    looked: int
    first: datetime | None
    last: datetime | None
    traces: int
    rows: list[dict[str, Any]]


async def read(conn: asyncpg.Connection, since: timedelta, limit: int) -> Read:
    """The spans discovery needs (two queries, each bounded by ``limit``)."""
    head = await conn.fetchrow(
        RUN_TRACES_SQL, since, limit, _MESSAGING_KINDS, [ATTR_STEP, *DESTINATION_KEYS]
    )
    traces = list(head["traces"])
    rows: list[asyncpg.Record] = []
    if traces:
        rows = await conn.fetch(
            TRACE_SPANS_SQL, traces, since, limit, _READ_KINDS, list(KEYS), RESOURCE_DISTRO_NAME
        )
    return Read(head["looked"], head["first"], head["last"], len(traces), [dict(r) for r in rows])


async def _fetch(url: str, since: timedelta, limit: int) -> Read | None:
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass('spans') IS NOT NULL"):
            return None
        return await read(conn, since, limit)
    finally:
        await conn.close()


def _fail(message: str, code: int) -> None:
    typer.echo(f"hoptrace: {message}", err=True)
    raise typer.Exit(code)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "?"


def discover_cli(since: str, limit: int) -> None:
    try:
        window = parse_duration(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", 2)
    if limit < 1:
        _fail(f"--limit must be at least 1, not {limit}", 2)
    url = get_settings().database_url
    try:
        got = asyncio.run(_fetch(url, window, limit))
    except (OSError, asyncpg.PostgresError) as exc:
        _fail(f"cannot read the span store at {url.split('@')[-1]}: {exc}", 1)
    if got is None:
        _fail("no span store (table spans) in this database: nothing to discover from", 1)
    assert got is not None
    proposal = discover(span_of(r) for r in got.rows)
    looked = (
        f"looked at {got.looked} spans of the last {since}"
        + (f" (the --limit {limit})" if got.looked >= limit else "")
        + f", then {len(got.rows)} spans of the {got.traces} traces holding runs"
        + (f" (the --limit {limit}: some traces cut)" if len(got.rows) >= limit else "")
    )
    if proposal is None:
        _fail(
            f"no pipeline step found: no consumer, producer or hoptrace step span ({looked}); "
            "widen --since, or check that the services export their spans to the collector",
            1,
        )
    assert proposal is not None
    header = [
        f"Proposed by `hoptrace spec discover --since {since}`: {looked},",
        f"stored {_when(got.first)} .. {_when(got.last)}.",
    ]
    typer.echo(render(proposal, header), nl=False)
    enabled = sum(s.enabled for s in proposal.steps)
    typer.echo(
        f"hoptrace: proposed {enabled} steps of pipeline {proposal.name!r}; {looked}; "
        f"deadlines: observed p99 x{MARGIN}",
        err=True,
    )
    for remark in proposal.remarks:
        typer.echo(f"hoptrace: note: {remark}", err=True)

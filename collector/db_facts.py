"""Database evidence of one correlation: its processed marks (each processed table of the spec,
``spec.processed_for(step)``) and, per step with an effect table, whether its row exists; all in
one round trip. Then, when asked and the table exists, its audited redrives (``redrives``, written
by ``hoptrace redrive``): a table the role may not read leaves them out, never the rest. Table and column names come from the spec (tables quoted, columns plain
identifiers the spec loader checked); the id is a bind parameter.
"""

from __future__ import annotations

import json
from datetime import datetime
from math import inf

import asyncpg

from hoptrace.contract import DEFAULT_CORRELATION_COLUMN, PipelineSpec, ProcessedTable
from hoptrace.contract.conventions import REDRIVES_TABLE

from .evidence_clients import EvidenceSources, quote
from .records import SOURCE_DATABASE, ProcessedEvent, RedriveRecord

REDRIVES_SQL = (
    "SELECT id, step, cause, action, result, who, at, source, sent, detail, trace_id "  # noqa: S608
    f"FROM {REDRIVES_TABLE} WHERE correlation_id = $1 ORDER BY at, id LIMIT 100"
)


def effect_sql(table: str, column: str = DEFAULT_CORRELATION_COLUMN) -> str:
    """Does ``table`` hold a row whose ``column`` is the correlation id ($1)? (Column names are
    plain identifiers, checked by the spec loader; table names may be schema-qualified.)"""
    return f"SELECT EXISTS (SELECT 1 FROM {quote(table)} WHERE {column} = $1)"  # noqa: S608


def processed_tables(spec: PipelineSpec) -> list[ProcessedTable]:
    """The distinct processed tables of the spec's steps, in step order."""
    out: dict[str, ProcessedTable] = {}
    for step in spec.steps:
        p = spec.processed_for(step)
        out.setdefault(p.table, p)
    return list(out.values())


def _columns(p: ProcessedTable) -> list[str | None]:
    return [p.event_id_column, p.event_type_column, p.source_column, p.processed_at_column]


def processed_sql(p: ProcessedTable) -> str:
    """The processed-marks query as the ``queries`` list shows it."""
    cols = ", ".join(c or "NULL" for c in _columns(p))
    order = f" ORDER BY {p.processed_at_column}" if p.processed_at_column else ""
    return f"SELECT {cols} FROM {p.table} WHERE {p.correlation_column} = $1{order}"  # noqa: S608


def _processed_expr(p: ProcessedTable, alias: str) -> str:
    eid, etype, source, at = (c or "NULL" for c in _columns(p))
    order = f" ORDER BY {at}" if p.processed_at_column else ""
    # identifiers from the spec (checked), the id is a bind parameter
    select = (
        f"SELECT coalesce(json_agg(json_build_object('event_id', {eid}, 'event_type', {etype}, "  # noqa: S608
        f"'source', {source}, 'processed_at', {at}){order}), '[]') FROM {quote(p.table)} "
        f"WHERE {p.correlation_column} = $1"
    )
    return f"({select})::text AS {alias}"


def _marks(raw: str, table: str) -> list[ProcessedEvent]:
    return [
        ProcessedEvent(
            None if p["event_id"] is None else str(p["event_id"]),
            p["event_type"],
            p["source"],
            datetime.fromisoformat(p["processed_at"]) if p["processed_at"] else None,
            table,
        )
        for p in json.loads(raw)
    ]


async def redrive_records(pool: asyncpg.Pool, cid: str) -> list[RedriveRecord]:
    """The correlation's audited redrives, oldest first (none when the table is not readable)."""
    try:
        rows = await pool.fetch(REDRIVES_SQL, cid)
    except (asyncpg.UndefinedTableError, asyncpg.InsufficientPrivilegeError):
        return []
    return [RedriveRecord(**dict(r)) for r in rows]


async def database_facts(
    sources: EvidenceSources,
    spec: PipelineSpec,
    cid: str,
    missing: dict[str, str],
    redrives: list[RedriveRecord] | None = None,
) -> tuple[tuple[ProcessedEvent, ...], dict[str, bool | None]]:
    """The processed marks and one EXISTS per step table, in one round trip. A step table that
    does not exist is missing evidence; a processed table that does not exist holds no marks.
    ``redrives``: a list to fill with the correlation's redrives (when the table exists)."""
    pool = await sources.db()
    if redrives is not None and await sources.table_exists(pool, REDRIVES_TABLE):
        redrives.extend(await redrive_records(pool, cid))
    marks = [p for p in processed_tables(spec) if await sources.table_exists(pool, p.table)]
    effects: dict[str, bool | None] = {}
    exprs: list[tuple[str, str]] = []
    for step in spec.steps:
        if not step.table:
            continue
        if await sources.table_exists(pool, step.table):
            sql = effect_sql(step.table, step.correlation_column)
            exprs.append((step.id, sql))
        else:
            effects[step.id] = None
            gone = f"table {step.table} not found"
            missing[SOURCE_DATABASE] = (
                f"{missing[SOURCE_DATABASE]}; {gone}" if SOURCE_DATABASE in missing else gone
            )
    cols = [f"{sql.removeprefix('SELECT ')} AS e{i}" for i, (_, sql) in enumerate(exprs)]
    cols += [_processed_expr(p, f"p{i}") for i, p in enumerate(marks)]
    processed: list[ProcessedEvent] = []
    if cols:
        row = await pool.fetchrow("SELECT " + ", ".join(cols), cid)  # noqa: S608
        for i, (sid, _) in enumerate(exprs):
            effects[sid] = bool(row[f"e{i}"])
        for i, p in enumerate(marks):
            processed += _marks(row[f"p{i}"], p.table)
    if len(marks) > 1:  # one list, in time order, as one table would give it
        processed.sort(key=lambda m: m.processed_at.timestamp() if m.processed_at else inf)
    return tuple(processed), effects

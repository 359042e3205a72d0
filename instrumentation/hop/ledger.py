"""The idempotency ledger ``processed_events``: its DDL, and the statements a hop runs in its one
transaction: the guard (was this event processed? what did it emit?), the effect check and the
processed mark (one statement for the default check: mark only if the effect row exists).

The runtime's own statements make no span unless asked (``trace_bookkeeping``): the process
span's outcome says what they found. They run past the asyncpg instrumentation's wrapper when
the speed-up allows (``_accel.asyncpg_spans.untraced``), else through it under
``suppress_instrumentation()``: no span either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
from opentelemetry.instrumentation.utils import suppress_instrumentation

from hoptrace.contract import Step

from .._accel import Speedup, enabled
from ..envelope import Envelope, RetryableError
from .context import EffectCheck

#: The ledger table.
TABLE = "processed_events"

#: Marks are keyed by event AND step (``source``): two steps consuming one event (a fan-out) each
#: mark it. A table made when marks were keyed by the event alone is re-keyed.
PROCESSED_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS processed_events (
    event_id       text NOT NULL,
    event_type     text NOT NULL,
    correlation_id text NOT NULL,
    source         text NOT NULL,
    processed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    emitted        jsonb,
    PRIMARY KEY (event_id, source)
);
CREATE INDEX IF NOT EXISTS processed_events_correlation_id_idx
    ON processed_events (correlation_id);
-- retention: a step purges its own old marks
CREATE INDEX IF NOT EXISTS processed_events_source_at_idx
    ON processed_events (source, processed_at);
DO $$ BEGIN
    IF (SELECT i.indnatts FROM pg_index i
        WHERE i.indrelid = 'processed_events'::regclass AND i.indisprimary) = 1 THEN
        ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey,
            ADD PRIMARY KEY (event_id, source);
    END IF;
END $$;
"""

GUARD_SQL = "SELECT emitted FROM processed_events WHERE event_id = $1 AND source = $2"
MARK_SQL = (
    "INSERT INTO processed_events (event_id, event_type, correlation_id, source, emitted)"
    " VALUES ($1, $2, $3, $4, $5::jsonb)"
)


#: Marks deleted per statement when purging (short transactions, no long lock).
PURGE_BATCH = 5000
_PURGE_SQL = """
DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_events
    WHERE source = $1 AND processed_at < clock_timestamp() - $2::interval
    LIMIT $3
))
"""


async def purge_marks(conn: asyncpg.Connection, step_id: str, older_than: timedelta) -> int:
    """Delete ``step_id``'s processed marks older than ``older_than``, in batches; returns how
    many. Only this step's marks: other steps (and pipelines) sharing the table keep theirs."""
    total = 0
    while True:
        status = await conn.execute(_PURGE_SQL, step_id, older_than, PURGE_BATCH)
        n = int(status.rsplit(" ", 1)[-1])
        total += n
        if n < PURGE_BATCH:
            return total


class EffectMissing(RetryableError):
    """The step's effect row is not there after the handler ran: roll back, do not mark."""


async def ensure_processed_events(conn: asyncpg.Connection) -> None:
    """Create the idempotency table ``processed_events`` (and its correlation index) if missing,
    keyed by (event, step). ``source`` is the step id that processed the event; ``emitted`` the
    next event it emitted."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('hoptrace.processed_events'))")
        await conn.execute(PROCESSED_EVENTS_DDL)


def _quote_ident(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def default_effect_check(table: str, column: str = "correlation_id") -> EffectCheck:
    """``SELECT 1 FROM <table> WHERE <column> = $1`` with the envelope's correlation id."""
    sql = f"SELECT 1 FROM {_quote_ident(table)} WHERE {_quote_ident(column)} = $1 LIMIT 1"  # noqa: S608

    async def check(conn: asyncpg.Connection, envelope: Envelope) -> bool:
        return await conn.fetchval(sql, envelope.correlation_id) is not None

    return check


def mark_with_effect_sql(table: str, column: str) -> str:
    """Insert the processed mark only if the effect row exists (one round trip)."""
    return (
        "INSERT INTO processed_events (event_id, event_type, correlation_id, source, emitted)"  # noqa: S608
        " SELECT $1, $2, $3, $4, $5::jsonb WHERE EXISTS (SELECT 1 FROM"
        f" {_quote_ident(table)} WHERE {_quote_ident(column)} = $3) RETURNING 1"
    )


def _suppressed(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any) -> Any:
        with suppress_instrumentation():
            return await method(*args)

    return call


class Ledger:
    """One step's guard and mark. ``effect_check`` defaults to a row in the step's ``table``
    with ``correlation_column = $1`` (then checked and marked in one statement);
    ``verify_effect=False`` marks without checking (the legacy bug, reproduced on purpose);
    ``traced=True`` lets the asyncpg instrumentation trace the ledger's statements."""

    def __init__(
        self,
        step: Step,
        effect_check: EffectCheck | None,
        *,
        verify_effect: bool = True,
        traced: bool = False,
    ) -> None:
        self.step = step
        self.mark_with_effect_sql: str | None = None
        if effect_check is None and step.table:
            effect_check = default_effect_check(step.table, step.correlation_column)
            self.mark_with_effect_sql = mark_with_effect_sql(step.table, step.correlation_column)
        self.effect_check = effect_check
        self.verify = verify_effect and effect_check is not None
        self.traced = traced
        self._untraced: Callable[[Any, str], Callable[..., Awaitable[Any]]] | None = None
        if not traced and enabled(Speedup.ASYNCPG_SPANS):
            from .._accel.asyncpg_spans import untraced

            self._untraced = untraced

    def _own(self, conn: asyncpg.Connection, name: str) -> Callable[..., Awaitable[Any]]:
        """A connection method for the ledger's own statements (traced only when asked)."""
        if self.traced:
            return getattr(conn, name)
        if self._untraced is not None:
            return self._untraced(conn, name)
        return _suppressed(getattr(conn, name))

    def _bookkeeping(self) -> contextlib.AbstractContextManager[object]:
        """A custom effect check's statements are bookkeeping too (traced only when asked)."""
        return contextlib.nullcontext() if self.traced else suppress_instrumentation()

    async def guard(self, conn: asyncpg.Connection, event_id: str) -> tuple[bool, Envelope | None]:
        """(already processed by this step?, the next event it emitted then)."""
        row = await self._own(conn, "fetchrow")(GUARD_SQL, event_id, self.step.id)
        if row is None:
            return False, None
        emitted = row["emitted"]
        return True, Envelope.model_validate_json(emitted) if emitted is not None else None

    async def mark(
        self, conn: asyncpg.Connection, envelope: Envelope, cid: str, next_env: Envelope | None
    ) -> None:
        """Effect check + processed mark (one statement for the default check); raises
        :class:`EffectMissing` when the effect is not there."""
        emitted = next_env.model_dump_json() if next_env is not None else None
        args = (envelope.event_id, envelope.type, cid, self.step.id, emitted)
        if self.verify and self.mark_with_effect_sql is not None:
            if await self._own(conn, "fetchval")(self.mark_with_effect_sql, *args) is None:
                raise EffectMissing(
                    f"effect missing: no row in {self.step.table!r} for correlation {cid!r}"
                )
            return
        if self.verify:
            with self._bookkeeping():
                if not await self.effect_check(conn, envelope):  # type: ignore[misc]
                    raise EffectMissing(
                        f"effect missing: the effect check for correlation {cid!r} failed"
                    )
        await self._own(conn, "execute")(MARK_SQL, *args)

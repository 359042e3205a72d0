"""Security fixtures: a canary in the per-test database, and a snapshot of what a statement could
change (every table's row count, the catalogue's table list, the canary's rows).

How the tests prove that no injected statement ran: each injection string is crafted so that, if
it were ever spliced into SQL, it would drop/insert into/update the canary table or another
table; the snapshot taken before and after every attack must be identical. (``log_statement`` /
``pg_stat_statements`` are not used: the server is shared with other test sessions.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

CANARY_ROWS = ["alpha", "beta", "gamma"]

INJECTIONS = [
    "x'; DROP TABLE canary; --",
    "x'); INSERT INTO canary VALUES ('pwned'); --",
    "1 OR 1=1",
    "' OR '1'='1",
    "1; UPDATE canary SET word = 'pwned'",
    "' UNION SELECT word FROM canary --",
    "$1; DELETE FROM canary",
    "\\'; DROP TABLE canary; --",
    "pay\u2019; DROP TABLE canary; --",
    "ＤＲＯＰ ＴＡＢＬＥ canary",
    "💳; DROP TABLE canary",
    "a" * 10_000,
    "x" * 129,
    "../../etc/passwd",
    "abc\n",
    "%00",
]


@dataclass
class Snapshot:
    tables: list[str]
    counts: dict[str, int]
    canary: list[str]


async def snapshot(db_url: str) -> Snapshot:
    conn = await asyncpg.connect(db_url)
    try:
        tables = [
            r["t"]
            for r in await conn.fetch(
                "SELECT schemaname || '.' || relname AS t FROM pg_stat_user_tables "
                # other sessions' temporary tables (the collector's COPY staging): no one else
                # may read them, and they go with their session
                "WHERE schemaname NOT LIKE 'pg\\_temp\\_%' ORDER BY 1"
            )
        ]
        counts = {}
        for t in tables:
            schema, name = t.split(".", 1)
            ident = f'"{schema}"."{name}"'
            counts[t] = await conn.fetchval(f"SELECT count(*) FROM {ident}")  # noqa: S608
        canary = [r["word"] for r in await conn.fetch("SELECT word FROM canary ORDER BY word")]
        return Snapshot(tables, counts, canary)
    finally:
        await conn.close()


async def _create_canary(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS canary (word text PRIMARY KEY)")
        await conn.executemany("INSERT INTO canary VALUES ($1)", [(w,) for w in CANARY_ROWS])
        await conn.execute("GRANT SELECT ON canary TO hoptrace_ro")
    finally:
        await conn.close()


@pytest.fixture
def canary(db_url: str) -> Iterator[str]:
    """The per-test database with a canary table (three rows); yields the database URL."""
    asyncio.run(_create_canary(db_url))
    yield db_url

"""The reference pipeline's schema: versioned, idempotent migrations applied by the services
themselves at start (and by :func:`migrate_cli`). Every business row carries ``correlation_id``
(the payment id) with a UNIQUE constraint, so a replay can never create a second row."""

from __future__ import annotations

import asyncio

import asyncpg

#: (version, description, SQL). Append only: never edit a released migration.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "catalogue: students and courses",
        """
        CREATE TABLE IF NOT EXISTS students (
            id text PRIMARY KEY,
            name text NOT NULL
        );
        CREATE TABLE IF NOT EXISTS courses (
            id text PRIMARY KEY,
            title text NOT NULL
        );
        INSERT INTO students (id, name)
            SELECT 'student-' || n, 'Student ' || n FROM generate_series(1, 100) AS n
            ON CONFLICT (id) DO NOTHING;
        INSERT INTO courses (id, title)
            SELECT 'course-' || n, 'Course ' || n FROM generate_series(1, 20) AS n
            ON CONFLICT (id) DO NOTHING;
        """,
    ),
    (
        2,
        "pipeline tables: payments, outbox, purchases, allocations, sessions",
        """
        CREATE TABLE IF NOT EXISTS payments (
            payment_id text PRIMARY KEY,
            correlation_id text NOT NULL UNIQUE,
            student text NOT NULL REFERENCES students(id),
            course text NOT NULL REFERENCES courses(id),
            amount numeric(12, 2) NOT NULL CHECK (amount > 0),
            status text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS payment_outbox (
            id bigserial PRIMARY KEY,
            correlation_id text NOT NULL UNIQUE,
            topic text NOT NULL,
            event bytea NOT NULL,
            trace_carrier jsonb NOT NULL DEFAULT '{}'::jsonb,
            created_at timestamptz NOT NULL DEFAULT now(),
            sent_at timestamptz
        );
        CREATE INDEX IF NOT EXISTS payment_outbox_unsent
            ON payment_outbox (id) WHERE sent_at IS NULL;
        CREATE TABLE IF NOT EXISTS student_course_purchases (
            id bigserial PRIMARY KEY,
            correlation_id text NOT NULL UNIQUE,
            payment_id text NOT NULL UNIQUE,
            student text NOT NULL,
            course text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS trainer_allocations (
            id bigserial PRIMARY KEY,
            correlation_id text NOT NULL UNIQUE,
            student text NOT NULL,
            course text NOT NULL,
            trainer text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE IF NOT EXISTS tutoring_sessions (
            id bigserial PRIMARY KEY,
            correlation_id text NOT NULL UNIQUE,
            student text NOT NULL,
            course text NOT NULL,
            trainer text NOT NULL,
            starts_at timestamptz NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        3,
        "payments: the client's Idempotency-Key (a retry returns the first payment)",
        """
        ALTER TABLE payments ADD COLUMN IF NOT EXISTS idempotency_key text UNIQUE;
        """,
    ),
    (
        4,
        "payment_outbox: sent rows are purged by retention (an index to find them)",
        """
        CREATE INDEX IF NOT EXISTS payment_outbox_sent_at
            ON payment_outbox (sent_at) WHERE sent_at IS NOT NULL;
        """,
    ),
]

_LOCK_KEY = 0x686F7074  # "hopt": one migrator at a time (services start together)


async def _ensure_processed_events(conn: asyncpg.Connection) -> None:
    from hoptrace.instrumentation.hop import ensure_processed_events

    await ensure_processed_events(conn)


async def migrate(database_url: str) -> list[int]:
    """Apply pending migrations (and the runtime's ``processed_events``). Returns the versions
    applied by this call; safe to call concurrently and repeatedly."""
    conn = await asyncpg.connect(database_url)
    applied: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS hoptrace_schema_migrations (
                    version int PRIMARY KEY,
                    description text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                r["version"]
                for r in await conn.fetch("SELECT version FROM hoptrace_schema_migrations")
            }
            for version, description, sql in MIGRATIONS:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO hoptrace_schema_migrations (version, description) VALUES ($1, $2)",
                        version,
                        description,
                    )
                applied.append(version)
            await _ensure_processed_events(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    return applied


def migrate_cli() -> None:
    """`hoptrace migrate`: apply the reference pipeline's migrations to HOPTRACE_DATABASE_URL."""
    import typer

    from hoptrace.settings import get_settings

    url = get_settings().database_url
    try:
        applied = asyncio.run(migrate(url))
    except (OSError, asyncpg.PostgresError) as exc:
        typer.echo(f"hoptrace: cannot migrate the database: {exc}", err=True)
        raise typer.Exit(2) from None
    if applied:
        typer.echo("applied migrations: " + ", ".join(str(v) for v in applied))
    else:
        typer.echo(f"schema up to date (version {MIGRATIONS[-1][0]})")

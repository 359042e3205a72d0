"""The HTTP services' PostgreSQL connection pools."""

from __future__ import annotations

import asyncpg


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool ``reset``: our services keep no session state (no LISTEN, SET or advisory locks),
    so skip asyncpg's default reset query: one round trip (and one span) less per request."""


def pool(database_url: str, size: int) -> asyncpg.Pool:
    """A pool of up to ``size`` connections (use as ``async with pool(...) as p``)."""
    return asyncpg.create_pool(database_url, min_size=2, max_size=size, reset=_keep_session)

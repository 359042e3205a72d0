"""``hoptrace stalls [--json]``: stuck correlations, stalled and failed, with their state, the step
(the overdue one; the one that failed for good), how long they have been stuck and since when.

With ``HOPTRACE_API_URL`` set they come from the collector's read API (``GET /api/v1/stalls``,
the same JSON), not from the database."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import asyncpg
import typer

from hoptrace.settings import get_settings

from . import store
from .api_client import ApiError, ReadApiClient, api_url
from .api_json import stall_json
from .render import printable


def _fmt_td(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


async def _fetch(limit: int) -> list[store.StallRow]:
    conn = await asyncpg.connect(get_settings().database_url)
    try:
        exists = await conn.fetchval("SELECT to_regclass('correlations') IS NOT NULL")
        return await store.stalled(conn, limit, failed=True) if exists else []
    finally:
        await conn.close()


def _rows(limit: int) -> list[dict[str, Any]]:
    if api_url() is None:
        return stall_json(asyncio.run(_fetch(limit)))
    try:
        with ReadApiClient.from_env() as client:
            return client.stalls(limit)
    except ApiError as exc:
        typer.echo(printable(f"hoptrace: {exc.detail}"), err=True)
        raise typer.Exit(1) from None


def stalls_cli(as_json: bool, limit: int = 100) -> None:
    rows = _rows(limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no stalled or failed correlations")
        return
    print(f"{'CORRELATION':<38} {'STATE':<8} {'STEP':<22} {'STUCK FOR':>10}  SINCE")
    for r in rows:
        since = datetime.fromisoformat(r["since"])
        error = r["last_error"]
        print(
            f"{r['correlation_id']:<38} {r['state']:<8} {r['step'] or '-':<22} "
            f"{_fmt_td(r['overdue_by_seconds']):>10}  {since:%Y-%m-%d %H:%M:%S}Z"
            + (f"  {error}" if error else "")
        )

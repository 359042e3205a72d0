"""``hoptrace stalls [--json]``: stuck correlations, stalled and failed, with their state, the step
(the overdue one; the one that failed for good), how long they have been stuck and since when."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from hoptrace.settings import get_settings

from . import store


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


def stalls_cli(as_json: bool, limit: int = 100) -> None:
    rows = asyncio.run(_fetch(limit))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "correlation_id": r.correlation_id,
                        "pipeline": r.pipeline,
                        "state": r.state,
                        "step": r.step,
                        "last_step": r.last_step,
                        "since": r.since.isoformat(),
                        "overdue_by_seconds": round(r.overdue_by.total_seconds(), 3),
                        "last_error": r.error,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    if not rows:
        print("no stalled or failed correlations")
        return
    print(f"{'CORRELATION':<38} {'STATE':<8} {'STEP':<22} {'STUCK FOR':>10}  SINCE")
    for r in rows:
        print(
            f"{r.correlation_id:<38} {r.state:<8} {r.step or '-':<22} "
            f"{_fmt_td(r.overdue_by.total_seconds()):>10}  {r.since:%Y-%m-%d %H:%M:%S}Z"
            + (f"  {r.error}" if r.error else "")
        )

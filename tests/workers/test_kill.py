"""Killing a worker mid-stream (SIGKILL) and restarting it loses nothing and duplicates nothing;
SIGTERM is a clean exit 0."""

from __future__ import annotations

import asyncio

from hoptrace.workers.client import traffic
from tests.support import wait_for

from .conftest import Pipeline
from .harness import fetchval

N = 120


async def _count_in(p: Pipeline, table: str, ids: list[str]) -> int:
    return await fetchval(
        p.db_url,
        f"SELECT count(*) FROM {table} WHERE correlation_id = ANY($1::text[])",  # noqa: S608
        ids,
    )


async def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(running: Pipeline) -> None:
    svc = running.services
    url = f"http://127.0.0.1:{running.env['HOPTRACE_PAYMENT_SERVICE_PORT']}"
    load = asyncio.create_task(traffic(60.0, N, url=url))

    async def some_allocated() -> bool:
        return await fetchval(running.db_url, "SELECT count(*) FROM trainer_allocations") >= 20

    await wait_for(some_allocated, timeout=30, what="the stream to be flowing")
    svc.kill("allocation-worker")
    svc.kill("purchase-worker")
    result = await load
    ids: list[str] = result["ids"]  # type: ignore[assignment]
    assert len(ids) == N and not result["errors"]
    svc.start("purchase-worker")
    svc.start("allocation-worker")

    async def all_sessions() -> bool:
        return await _count_in(running, "tutoring_sessions", ids) == N

    await wait_for(all_sessions, timeout=60, what=f"{N} tutoring sessions")
    for table in (
        "payments",
        "student_course_purchases",
        "trainer_allocations",
        "tutoring_sessions",
    ):
        assert await _count_in(running, table, ids) == N, table
    marks = await fetchval(
        running.db_url,
        "SELECT count(*) FROM processed_events WHERE correlation_id = ANY($1::text[])",
        ids,
    )
    assert marks == 3 * N


def test_sigterm_is_a_clean_exit(running: Pipeline) -> None:
    for name in ("session-worker", "payment-service"):
        assert running.services.stop(name) == 0, running.services.tail(name)

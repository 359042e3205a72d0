"""The overview's counts (funnel, states) from ``done_mask``: exact per-step semantics, rows stored
before the column existed, their backfill by the migration, and the index-only plan."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from hoptrace.collector import schema, store
from hoptrace.collector.service import Collector
from hoptrace.collector.state import StepObs, fold
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

from ..support import wait_for
from .helpers import request, step_span

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
EXPECTED = {
    # full-0..3: steps 0..n done; gap: trainer.allocated done without purchase.created's span;
    # fail: payment.confirmed done, purchase.created errored
    "payment.confirmed": 6,
    "purchase.created": 3,
    "trainer.allocated": 3,
    "session.created": 1,
}


async def _seed(collector: Collector) -> None:
    now = time.time_ns()
    spans = []
    for n in range(4):
        for i in range(n + 1):
            spans.append(step_span(f"full-{n}", i, start_ns=now + i * 1_000_000))
    spans += [step_span("gap", 0, start_ns=now), step_span("gap", 2, start_ns=now + 2_000_000)]
    spans += [step_span("fail", 0, start_ns=now), step_span("fail", 1, outcome="error")]
    async with httpx.AsyncClient() as h:
        r = await h.post(
            f"http://127.0.0.1:{collector.http_port}/v1/traces",
            content=request(spans).SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
        )
        assert r.status_code == 200
    await wait_for(collector.drain)


async def test_funnel_counts_each_done_step_even_after_a_gap(
    collector: Collector, pool: asyncpg.Pool
) -> None:
    await _seed(collector)
    since = datetime.now(UTC) - timedelta(minutes=5)
    assert await store.funnel(pool, since, SPEC) == EXPECTED
    masks = dict(await pool.fetch("SELECT correlation_id, done_mask FROM correlations"))
    assert masks["gap"] == 0b101 and masks["full-3"] == 0b1111 and masks["fail"] == 0b1
    assert await store.state_counts(pool, since) == {
        "in_progress": 4,
        "completed": 1,
        "failed": 1,
        "stalled": 0,
    }
    assert await store.funnel(
        pool, datetime.now(UTC) + timedelta(minutes=1), SPEC
    ) == dict.fromkeys(EXPECTED, 0)


async def test_rows_without_mask_are_counted_then_backfilled(
    collector: Collector, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "BACKFILL_VACUUM_ROWS", 5)  # 5 rows to fill: vacuumed after
    await _seed(collector)
    since = datetime.now(UTC) - timedelta(minutes=5)
    written = dict(await pool.fetch("SELECT correlation_id, done_mask FROM correlations"))
    # as if stored by a collector before done_mask existed
    await pool.execute("UPDATE correlations SET done_mask = NULL WHERE correlation_id <> 'full-1'")
    assert await store.funnel(pool, since, SPEC) == EXPECTED
    async with pool.acquire() as conn:
        await schema.migrate(conn, timedelta(days=1), spec=SPEC)
        assert (
            dict(await conn.fetch("SELECT correlation_id, done_mask FROM correlations")) == written
        )
        assert await conn.fetchval(
            "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'correlations'"
        )
        await conn.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT done_mask, count(*) FROM correlations "
                "WHERE first_seen >= now() - interval '1 day' GROUP BY done_mask"
            )
        )
        assert "Index Only Scan using correlations_overview_idx" in plan, plan
    assert await store.funnel(pool, since, SPEC) == EXPECTED


def test_long_pipelines_store_no_mask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = '[pipeline]\nname = "long"\ncorrelation_key = "id"\n'
    for i in range(33):
        body += f'\n[[steps]]\nid = "s{i}"\nservice = "svc{i}"\ndeadline = "5s"\nemits = "t{i}"\n'
        if i:
            body += f'consumes = "t{i - 1}"\ngroup = "g{i}"\n'
    (tmp_path / "long.toml").write_text(body)
    long_spec = load_spec(tmp_path / "long.toml")
    now = datetime.now(UTC)
    us = int(now.timestamp() * 1_000_000)
    new = fold(long_spec, None, [StepObs("c", "s32", us, us + 1, "ok")], now)
    assert new["done_mask"] is None and new["last_step"] == "s32"
    assert fold(SPEC, None, [StepObs("c", SPEC.steps[3].id, us, us + 1, "ok")], now)[
        "done_mask"
    ] == (1 << 3)

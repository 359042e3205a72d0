"""Correlation state: pure folding rules, and incremental updates from real batches."""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from hoptrace.collector import store
from hoptrace.collector.service import Collector
from hoptrace.collector.state import StepObs, fold
from hoptrace.contract import load_spec
from hoptrace.settings import PROJECT_ROOT

from ..support import wait_for
from .helpers import STEPS, request, step_span

SPEC = load_spec(PROJECT_ROOT / "pipelines" / "payments.toml")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_US = int(T0.timestamp()) * 1_000_000


def obs(i: int, at: float, outcome: str = "ok", cid: str = "c") -> StepObs:
    start = T0_US + int(at * 1_000_000)
    return StepObs(
        cid, STEPS[i], start, start + 100_000, outcome, "boom" if outcome == "error" else None
    )


def run(batches: list[list[StepObs]], state: str | None = None) -> dict:
    row = None
    for b in batches:
        new = fold(SPEC, row, b, T0)
        row = {**new, "state": state if state and row is None else new["state"]}
    return row  # type: ignore[return-value]


def test_in_order_progress_and_deadline() -> None:
    r = run([[obs(0, 0)], [obs(1, 1)]])
    assert r["state"] == "in_progress" and r["last_step"] == "purchase.created"
    assert r["next_step"] == "trainer.allocated"
    assert (
        r["next_deadline"] == T0 + timedelta(seconds=1.1) + SPEC.step("trainer.allocated").deadline
    )


def test_out_of_order_and_duplicates_same_result() -> None:
    spans = [obs(0, 0), obs(1, 1), obs(2, 2), obs(1, 5, "duplicate")]
    in_order = run([[s] for s in spans])
    for _ in range(5):
        shuffled = spans[:]
        random.shuffle(shuffled)
        r = run([[s] for s in shuffled])
        for k in ("state", "last_step", "last_step_at", "next_step", "next_deadline"):
            assert r[k] == in_order[k]
    assert in_order["last_step"] == "trainer.allocated"
    # last_step never moves backwards when an earlier step arrives late
    assert run([[obs(2, 2)], [obs(0, 0)]])["last_step"] == "trainer.allocated"


def test_failure_then_retry_success() -> None:
    r = run([[obs(0, 0)], [obs(1, 1, "error")]])
    assert (
        r["state"] == "failed" and r["failed_step"] == "purchase.created" and r["error"] == "boom"
    )
    r2 = fold(SPEC, r, [obs(1, 3)], T0)
    assert (
        r2["state"] == "in_progress"
        and r2["failed_step"] is None
        and r2["last_step"] == "purchase.created"
    )
    assert r2["steps"]["purchase.created"]["count"] == 2


def test_completion() -> None:
    r = run([[obs(3, 3)], [obs(0, 0), obs(1, 1), obs(2, 2)]])
    assert r["state"] == "completed" and r["next_deadline"] is None
    assert r["completed_at"] == T0 + timedelta(seconds=3.1)


def test_stalled_stays_until_progress_then_resolves() -> None:
    r = fold(SPEC, None, [obs(0, 0)], T0)
    r["state"] = "stalled"
    same = fold(SPEC, r, [obs(0, 0, "duplicate")], T0)
    assert same["state"] == "stalled" and not same["resolved"]
    moved = fold(SPEC, r, [obs(1, 1)], T0)
    assert moved["state"] == "in_progress" and moved["resolved"]


def test_a_stall_moves_on_only_when_its_due_step_or_deadline_does(tmp_path: Path) -> None:
    """Out-of-order evidence (spans on several partitions): a step newly done is no progress
    unless the step due next changes or its deadline is no longer passed."""
    late = T0 + timedelta(minutes=5)  # every deadline long passed
    r = fold(SPEC, None, [obs(1, 1)], late)  # purchase.created first
    r["state"] = "stalled"  # the scan's doing (one alert)
    same = fold(SPEC, r, [obs(0, 0)], late)  # payment.confirmed, late
    assert (same["state"], same["resolved"], same["next_step"]) == (
        "stalled", False, "trainer.allocated"
    )  # fmt: skip
    assert same["next_deadline"] == r["next_deadline"]
    # another run of the done step, ended earlier: an earlier deadline, still passed
    rerun = StepObs("c", STEPS[1], T0_US, T0_US + 1_000, "duplicate")
    earlier = fold(SPEC, same, [rerun], late)
    assert earlier["next_deadline"] < same["next_deadline"]
    assert earlier["state"] == "stalled" and not earlier["resolved"]
    # deadlines lengthened in the spec (collector restarted): the due step is no longer overdue
    text = (PROJECT_ROOT / "pipelines" / "payments.toml").read_text()
    (tmp_path / "payments.toml").write_text(re.sub(r'deadline = "[^"]+"', 'deadline = "1h"', text))
    longer = fold(load_spec(tmp_path / "payments.toml"), same, [obs(0, 0, "duplicate")], late)
    assert longer["next_deadline"] > late
    assert longer["state"] == "in_progress" and longer["resolved"]
    # the due step done: on to the next one (overdue too: the scan fires anew, for that step)
    done = fold(SPEC, same, [obs(2, 2)], late)
    assert done["next_step"] == "session.created" and done["next_deadline"] < late
    assert done["state"] == "in_progress" and done["resolved"]


async def test_incremental_state_from_out_of_order_duplicate_batches(
    collector: Collector, pool
) -> None:
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    now = time.time_ns()
    spans = [step_span("ooo", i, start_ns=now + i * 10_000_000) for i in range(4)]
    batches = [[spans[2]], [spans[0], spans[0]], [spans[3]], [spans[2]], [spans[1]]]
    async with httpx.AsyncClient() as h:
        for b in batches:
            r = await h.post(
                url,
                content=request(b).SerializeToString(),
                headers={"content-type": "application/x-protobuf"},
            )
            assert r.status_code == 200
            assert await collector.drain()
            row = await store.correlation(pool, "ooo")
            assert row is not None
            if b is batches[0]:
                assert row.last_step == "trainer.allocated" and row.state == "in_progress"
            if b is batches[2]:
                assert row.state == "completed"
    row = await store.correlation(pool, "ooo")
    assert row.state == "completed" and row.last_step == "session.created"
    assert {k: v.count for k, v in row.steps.items()} == dict.fromkeys(
        STEPS, 1
    )  # duplicates ignored
    assert all(v.done for v in row.steps.values())
    assert len(await store.spans_for_correlation(pool, "ooo")) == 4


async def test_read_api_aggregates(collector: Collector, pool) -> None:
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    now = time.time_ns()
    spans = []
    for n in range(6):  # correlation n gets the first (n % 4)+1 steps
        for i in range(n % 4 + 1):
            spans.append(step_span(f"agg-{n}", i, start_ns=now + i * 100_000_000))
    spans.append(step_span("agg-fail", 0, start_ns=now))
    spans.append(step_span("agg-fail", 1, start_ns=now, outcome="error", error="db down"))
    async with httpx.AsyncClient() as h:
        r = await h.post(
            url,
            content=request(spans).SerializeToString(),
            headers={"content-type": "application/x-protobuf"},
        )
        assert r.status_code == 200
    await wait_for(collector.drain)
    since = datetime.now(UTC) - timedelta(minutes=5)
    counts = await store.state_counts(pool, since)
    assert counts == {"in_progress": 5, "completed": 1, "failed": 1, "stalled": 0}
    f = await store.funnel(pool, since, SPEC)
    assert list(f) == STEPS
    assert f == {
        "payment.confirmed": 7,
        "purchase.created": 4,
        "trainer.allocated": 2,
        "session.created": 1,
    }
    lat = await store.hop_latencies(pool, since, spec=SPEC)
    assert len(lat["purchase.created"].samples) == 4 and len(lat["session.created"].samples) == 1
    assert (
        abs(lat["purchase.created"].p50 - 0.1) < 0.001
        and abs(lat["trainer.allocated"].p99 - 0.1) < 0.001
    )
    assert abs(lat["payment.confirmed"].p95 - 0.005) < 0.001  # first step: its own duration
    failed = await store.correlation(pool, "agg-fail")
    assert (
        failed.state == "failed"
        and failed.error == "db down"
        and failed.failed_step == "purchase.created"
    )

"""Dead-lettered payments alert: a ``failed`` correlation raises an alert (cause from the
diagnosis hook), a stalled one that then fails keeps a firing alert, the alert resolves when the
payment completes after all; ``hoptrace stalls`` lists stalled and failed payments with their state.

Before the fix the scan looked only at ``in_progress``: a failed payment never alerted, and a
stalled one's alert was resolved the moment its step was dead-lettered (nothing fired again).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from hoptrace.collector import schema, store
from hoptrace.collector.service import Collector
from hoptrace.settings import PROJECT_ROOT

from ..support import wait_for
from .helpers import request, step_span
from .receiver import Receiver

PB = {"content-type": "application/x-protobuf"}
FAILED_ALERT = "HoptraceFailedCorrelation"
STALLED_ALERT = "HoptraceStalledCorrelation"


async def _post(c: Collector, spans: list) -> None:  # type: ignore[type-arg]
    async with httpx.AsyncClient() as h:
        r = await h.post(
            f"http://127.0.0.1:{c.http_port}/v1/traces",
            content=request(spans).SerializeToString(),
            headers=PB,
        )
        assert r.status_code == 200, r.text


def _events(rx: Receiver, cid: str, status: str | None = None) -> list[dict[str, Any]]:
    """The webhook's alerts of ``cid`` (optionally of one status), in arrival order (a request
    lists one group's alerts: payments stuck at one step for one cause)."""
    return [
        a
        for p in rx.webhook()
        for a in p["alerts"]
        if a["labels"]["correlation_id"] == cid and status in (None, a["status"])
    ]


async def test_failed_payment_alerts_with_its_cause_and_resolves_when_it_completes(
    make_collector, fast_spec: Path, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    async def cause_for(cid: str) -> tuple[str | None, str | None]:
        return "downstream_error", f"{cid}: admin answered 500, record dead-lettered"

    async with Receiver() as rx:
        c = await make_collector(
            pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook", cause_for=cause_for
        )
        # dlq-1: purchase.created errored (retries exhausted, dead-lettered): failed, never stalled
        await _post(
            c,
            [
                step_span("dlq-1", 0),
                step_span("dlq-1", 1, outcome="error", error="dead-lettered after 3 attempts"),
            ],
        )
        # stuck-1: stalls first (its alert fires), then its step is dead-lettered
        await _post(c, [step_span("stuck-1", 0)])

        async def fired(cid: str, name: str) -> list[dict[str, Any]] | None:
            got = [a for a in _events(rx, cid, "firing") if a["labels"]["alertname"] == name]
            return got or None

        (dlq,) = await wait_for(lambda: fired("dlq-1", FAILED_ALERT), what="dlq-1 failed alert")
        assert dlq["labels"]["step"] == "purchase.created"
        assert dlq["labels"]["cause"] == "downstream_error"
        assert dlq["labels"]["severity"] == "critical"  # failed: it will not move by itself
        assert dlq["labels"]["service"] == "purchase-worker"
        assert "dead-lettered" in dlq["annotations"]["evidence"]
        assert "failed" in dlq["annotations"]["summary"]
        (stall,) = await wait_for(lambda: fired("stuck-1", STALLED_ALERT), what="stuck-1 stall")
        assert stall["labels"]["severity"] == "warning"  # stalled: moves once its step runs
        await _post(c, [step_span("stuck-1", 1, outcome="error", error="dead-lettered")])
        (stuck,) = await wait_for(
            lambda: fired("stuck-1", FAILED_ALERT), what="stuck-1 failed alert after its stall"
        )
        assert stuck["labels"]["cause"] == "downstream_error"
        assert stuck["labels"]["severity"] == "critical"
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            assert (await store.correlation(pool, "stuck-1")).state == "failed"
            firing = {a.correlation_id for a in await store.alerts(pool, status="firing")}
            assert firing == {"dlq-1", "stuck-1"}  # the failed payments are alerting now
            # more scans: nothing fires twice
            scans = c.scanner.scans
            await wait_for(lambda: _true(c.scanner.scans >= scans + 5), what="5 more scans")
            assert len(_events(rx, "dlq-1", "firing")) == 1
            assert len(await store.alerts_for_correlation(pool, "dlq-1")) == 1
            # dlq-1 is redelivered from its dead-letter topic and completes: its alert resolves
            await _post(c, [step_span("dlq-1", i) for i in (1, 2, 3)])
            (done,) = await wait_for(
                lambda: _some(_events(rx, "dlq-1", "resolved")), what="dlq-1 resolved"
            )
            assert done["labels"]["alertname"] == FAILED_ALERT
            (row,) = await store.alerts_for_correlation(pool, "dlq-1")
            assert row.status == "resolved" and row.delivered_resolved
            assert (await store.correlation(pool, "dlq-1")).state == "completed"
        finally:
            await pool.close()


async def _true(value: bool) -> bool:
    return value


async def _some(value: list[Any]) -> list[Any] | None:
    return value or None


async def test_stalls_cli_lists_stalled_and_failed_with_their_state(
    db_url: str, hoptrace_env: dict[str, str]
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        await conn.execute(
            "INSERT INTO correlations (correlation_id, pipeline, state, last_step, next_step, "
            "next_deadline, failed_step, failed_at, error) VALUES "
            "('cli-stalled', 'payments', 'stalled', 'purchase.created', 'trainer.allocated', "
            " now() - interval '90 seconds', NULL, NULL, NULL),"
            "('cli-failed', 'payments', 'failed', 'payment.confirmed', NULL, NULL, "
            " 'purchase.created', now() - interval '300 seconds', 'dead-lettered'),"
            "('cli-ok', 'payments', 'in_progress', 'purchase.created', 'trainer.allocated', "
            " now() + interval '1 hour', NULL, NULL, NULL)"
        )
    finally:
        await conn.close()
    exe = os.path.join(PROJECT_ROOT, ".venv", "bin", "hoptrace")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "stalls", *args], env=hoptrace_env, capture_output=True, text=True, timeout=60
        )

    out = await asyncio.to_thread(run, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["correlation_id"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"cli-stalled", "cli-failed"}
    assert rows["cli-stalled"]["state"] == "stalled"
    assert rows["cli-stalled"]["step"] == "trainer.allocated"
    assert rows["cli-failed"]["state"] == "failed"
    assert rows["cli-failed"]["step"] == "purchase.created"
    assert rows["cli-failed"]["overdue_by_seconds"] >= 300  # stuck since it failed
    assert rows["cli-failed"]["last_error"] == "dead-lettered"
    # longest stuck first
    assert [r["correlation_id"] for r in json.loads(out.stdout)] == ["cli-failed", "cli-stalled"]
    text = await asyncio.to_thread(run)
    assert text.returncode == 0, text.stderr
    line = next(ln for ln in text.stdout.splitlines() if "cli-failed" in ln)
    assert "failed" in line.split() and "purchase.created" in line

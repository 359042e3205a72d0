"""A hung stall-scan leader is replaced within seconds, and alert deliveries are claimed so two
collectors never both send one.

Two ``hoptrace collector`` processes share one store; the leader is frozen with SIGSTOP (it keeps
its TCP connections and its database sessions, as a process stuck in a GC pause, a swap storm or
a hung NFS read does). Before the fix leadership was a session advisory lock that the frozen
process kept forever: nobody scanned, no stalled payment alerted. Now leadership is a lease on
the ``stall_scan`` row that the frozen leader stops renewing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from benchmarks.otlp_fuzz import CollectorProc
from hoptrace.collector import schema
from hoptrace.collector.alerts import AlertDispatcher, Targets
from hoptrace.collector.lease import Lease

from ..support import wait_for
from .helpers import request, step_span
from .receiver import Receiver

PB = {"content-type": "application/x-protobuf"}
LEADERSHIP = "stall scan leadership acquired"


async def _post(col: CollectorProc, spans: list) -> None:  # type: ignore[type-arg]
    async with httpx.AsyncClient(timeout=10) as h:
        r = await h.post(
            f"{col.http}/v1/traces", content=request(spans).SerializeToString(), headers=PB
        )
        assert r.status_code == 200, r.text


def _leads(col: CollectorProc) -> int:
    """How often ``col`` has logged that it acquired the scan leadership."""
    try:
        return col.log.read_text(errors="replace").count(LEADERSHIP)
    except OSError:
        return 0


def _fired(rx: Receiver, cid: str) -> int:
    """Firing notifications of ``cid`` (a webhook post lists every alert of its group)."""
    return sum(
        1 for p in rx.webhook("firing") for a in p["alerts"] if a["labels"]["correlation_id"] == cid
    )


@pytest.fixture
async def two_collectors(
    db_url: str, fast_spec: Path, tmp_path: Path
) -> AsyncIterator[tuple[Receiver, CollectorProc, CollectorProc]]:
    async with Receiver() as rx:
        env = {
            "HOPTRACE_ALERT_WEBHOOK_URL": f"{rx.url}/hook",
            "HOPTRACE_STALL_SCAN_INTERVAL": "0.2",
            "HOPTRACE_STALL_GRACE": "0",
        }
        procs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            procs.append(CollectorProc(db_url, fast_spec, tmp_path / name, extra_env=env))
        try:
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
            yield rx, procs[0], procs[1]
        finally:
            for p in procs:
                if p.proc is not None and p.proc.poll() is None:
                    os.kill(p.proc.pid, signal.SIGCONT)  # a stopped process cannot exit
            codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
            assert codes == [0, 0], [p.tail() for p in procs]


async def test_frozen_leader_is_replaced_within_seconds_and_nothing_fires_twice(
    two_collectors: tuple[Receiver, CollectorProc, CollectorProc], db_url: str
) -> None:
    rx, a, b = two_collectors

    async def one_leader() -> bool:
        return (_leads(a) > 0) != (_leads(b) > 0)

    await wait_for(one_leader, timeout=20, what="exactly one scan leader")
    leader, other = (a, b) if _leads(a) else (b, a)
    assert leader.proc is not None
    # it works while the leader is alive: a stalled payment fires once
    await _post(other, [step_span("before-freeze", 0)])
    await wait_for(lambda: _ready(_fired(rx, "before-freeze")), timeout=30, what="first alert")

    os.kill(leader.proc.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        await _post(other, [step_span("while-frozen", 0)])
        await wait_for(
            lambda: _ready(_fired(rx, "while-frozen")),
            timeout=30,
            what="the stalled payment's alert while the leader is frozen",
        )
        took = time.monotonic() - frozen_at
        print(f"frozen leader replaced, first alert sent {took:.1f}s after SIGSTOP")
        assert _leads(other) >= 1, other.tail()
        assert took < 15, f"takeover took {took:.1f}s"
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    # the old leader wakes up: it must not scan or send beside the new one
    await _post(leader, [step_span("after-wake", 0)])
    await wait_for(lambda: _ready(_fired(rx, "after-wake")), timeout=30, what="alert after wake")
    conn = await asyncpg.connect(db_url)
    try:
        beats = 0
        last = await conn.fetchval("SELECT heartbeat FROM stall_scan")

        async def scanned_on() -> bool:  # 10 more scans by whoever leads now
            nonlocal beats, last
            now = await conn.fetchval("SELECT heartbeat FROM stall_scan")
            if now != last:
                beats, last = beats + 1, now
            return beats >= 10

        await wait_for(scanned_on, timeout=30, what="10 more scans")
        fired = [p["alerts"][0]["labels"]["correlation_id"] for p in rx.webhook("firing")]
        assert sorted(fired) == ["after-wake", "before-freeze", "while-frozen"], fired
        assert await conn.fetchval("SELECT count(*) FROM alerts") == 3
    finally:
        await conn.close()
    assert a.alive() and b.alive()


async def _ready(value: Any) -> Any:
    return value or None


async def test_alert_deliveries_are_claimed_two_dispatchers_send_each_once(db_url: str) -> None:
    """Both dispatchers believe they lead (a frozen leader waking up does, until its next scan):
    each alert event still reaches the receiver once, however their passes overlap."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        await conn.execute(
            "INSERT INTO alerts (correlation_id, pipeline, step, diagnosed) "
            "SELECT 'claim-' || g, 'payments', 'purchase.created', true "
            "FROM generate_series(1, 12) g"
        )
    finally:
        await conn.close()
    async with Receiver(delay=0.05) as rx:  # a slow receiver: the passes overlap
        pools = [await asyncpg.create_pool(db_url, min_size=1, max_size=2) for _ in range(2)]
        targets = Targets(None, f"{rx.url}/hook", "http://dash", "http://jaeger")
        ds = [AlertDispatcher(p, targets, lambda: True) for p in pools]
        try:
            sent = await asyncio.gather(*(d.deliver_due() for d in ds))
            sent += await asyncio.gather(*(d.deliver_due() for d in ds))
            fired = [
                a["labels"]["correlation_id"] for p in rx.webhook("firing") for a in p["alerts"]
            ]
            assert sorted(fired) == sorted(f"claim-{g}" for g in range(1, 13)), fired
            assert sum(sent) == 12
            n = await pools[0].fetchval("SELECT count(*) FROM alerts WHERE delivered_firing")
            assert n == 12
        finally:
            for d in ds:
                await d.aclose()
            for p in pools:
                await p.close()


async def test_a_leader_frozen_inside_its_scan_transaction_is_cut_off(
    make_collector, db_url: str, fast_spec: Path
) -> None:  # type: ignore[no-untyped-def]
    """A leader frozen between two statements of its scan keeps the lease row locked: the
    server ends its session after the lease's time (``idle_in_transaction_session_timeout``),
    so the row is free again and another collector takes the lease."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=1))
        frozen = Lease(ttl=2.0)
        frozen_pid = conn.get_server_pid()
        tr = conn.transaction()
        await tr.start()
        assert await frozen.claim(conn) is not None  # ... and then nothing more from it
        c = await make_collector(pipeline=fast_spec)
        await wait_for(
            lambda: _ready(c.scanner.is_leader), timeout=15, what="the other collector leads"
        )
        # its session was ended by the server (asked of the server: what the frozen client's
        # own connection raises on its next use depends on when it read the server's notice)
        # (its locks go before its backend exits: a moment to leave pg_stat_activity)
        await wait_for(
            lambda: c.pool.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", frozen_pid
            ),
            timeout=5,
            what="the frozen leader's session ended by the server",
        )
        assert await c.pool.fetchval("SELECT leader FROM stall_scan") == c.scanner.lease.holder
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)

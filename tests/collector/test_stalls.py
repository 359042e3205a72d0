"""Stall detection and alert delivery against a real HTTP receiver; two replicas on one store."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx

from hoptrace.collector import schema, store
from hoptrace.collector.decode import us_to_dt
from hoptrace.collector.service import Collector

from ..support import wait_for
from .helpers import request, spans_locked, step_span
from .receiver import Receiver

PB = {"content-type": "application/x-protobuf"}


async def _post(c: Collector, spans: list) -> None:  # type: ignore[type-arg]
    async with httpx.AsyncClient() as h:
        r = await h.post(
            f"http://127.0.0.1:{c.http_port}/v1/traces",
            content=request(spans).SerializeToString(),
            headers=PB,
        )
        assert r.status_code == 200, r.text


async def test_stall_fires_once_resolves_once(make_collector, fast_spec: Path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    async def cause_for(cid: str) -> tuple[str | None, str | None]:
        return "no_consumer", f"group of {cid} has no members"

    async with Receiver(fail_first=2) as rx:  # down for the first two deliveries: retried
        c = await make_collector(
            pipeline=fast_spec,
            alert_webhook_url=f"{rx.url}/hook",
            alertmanager_url=rx.url,
            cause_for=cause_for,
            dashboard_url="http://dash.example",
            jaeger_url="http://jaeger.example",
        )
        now = time.time_ns()
        first = step_span("stall-1", 0, start_ns=now)
        await _post(c, [first] + [step_span("done-1", i, start_ns=now) for i in range(4)])
        fired = await wait_for(
            lambda: _ready(rx.webhook("firing")), timeout=15, what="firing webhook"
        )
        alert = fired[0]["alerts"][0]
        assert fired[0]["version"] == "4" and fired[0]["status"] == "firing"
        # routed like a Prometheus alert: the cause and the step's service are labels
        assert alert["labels"] == {
            "alertname": "HoptraceStalledCorrelation",
            "severity": "warning",
            "pipeline": "payments",
            "step": "purchase.created",
            "cause": "no_consumer",
            "service": "purchase-worker",
            "correlation_id": "stall-1",
        }
        assert fired[0]["groupLabels"] == {
            "pipeline": "payments",
            "step": "purchase.created",
            "cause": "no_consumer",
        }
        assert "no running members" in alert["annotations"]["description"]
        assert alert["annotations"]["evidence"] == "group of stall-1 has no members"
        assert alert["annotations"]["dashboard_url"] == "http://dash.example/?id=stall-1"
        assert (
            alert["annotations"]["jaeger_url"]
            == f"http://jaeger.example/trace/{first[1].trace_id.hex()}"
        )
        am = rx.alertmanager()
        assert am and am[0]["labels"]["correlation_id"] == "stall-1" and "endsAt" not in am[0]
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            stalls = await store.stalled(pool)
            assert [s.correlation_id for s in stalls] == [
                "stall-1"
            ]  # done-1 completed: never stalls
            assert stalls[0].step == "purchase.created" and stalls[0].overdue_by.total_seconds() > 0
            # more scans and delivery passes: still exactly one firing on the webhook, while
            # Alertmanager gets the firing alert re-sent (else it would time it out)
            c.dispatcher.resend_interval = 0.3
            await wait_for(lambda: _true(len(rx.alertmanager()) >= 2), what="alertmanager re-send")
            assert all("endsAt" not in x for x in rx.alertmanager())
            assert [a["labels"]["correlation_id"] for a in _alerts(rx, "firing")] == ["stall-1"]
            # completes late: resolves once
            await _post(c, [step_span("stall-1", i) for i in (1, 2, 3)])
            resolved = await wait_for(
                lambda: _ready(rx.webhook("resolved")), timeout=15, what="resolved webhook"
            )
            assert resolved[0]["alerts"][0]["labels"] == alert["labels"]  # the same alert
            assert resolved[0]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
            scans = c.scanner.scans
            await wait_for(lambda: _true(c.scanner.scans >= scans + 3), what="3 more scans")
            assert len(rx.webhook("resolved")) == 1
            assert any("endsAt" in a for a in rx.alertmanager())
            rows = await store.alerts(pool)
            mine = [a for a in rows if a.correlation_id == "stall-1"]
            assert len(mine) == 1 and mine[0].status == "resolved" and mine[0].delivered_resolved
            assert mine[0].cause == "no_consumer" and mine[0].attempts == 2 and rx.failures == 2
            assert (await store.correlation(pool, "stall-1")).state == "completed"
        finally:
            await pool.close()


async def _ready(value):  # type: ignore[no-untyped-def]
    return value or None


def _alerts(rx: Receiver, status: str) -> list[dict]:  # type: ignore[type-arg]
    """Every ``status`` event the webhook got, in arrival order (one request lists a group's
    alerts, and may mix firing and resolved ones)."""
    return [a for p in rx.webhook() for a in p["alerts"] if a["status"] == status]


async def _true(value: bool) -> bool:
    return value


async def test_two_replicas_no_duplicate_alert_no_lost_span(
    make_collector, fast_spec: Path, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    async with Receiver() as rx:
        a = await make_collector(pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook")
        b = await make_collector(pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook")
        await wait_for(lambda: _true(a.scanner.is_leader or b.scanner.is_leader), what="a leader")
        assert not (a.scanner.is_leader and b.scanner.is_leader)
        n = 40
        now = time.time_ns()
        sent = 0
        # every correlation's spans are split across both replicas (step 0 via a, step 1 via b)
        tasks = []
        for k in range(n):
            tasks.append(
                _post(a, [step_span(f"rep-{k}", 0, start_ns=now)] + [step_span(f"noise-{k}", 0)])
            )
            tasks.append(_post(b, [step_span(f"rep-{k}", 1, start_ns=now + 1_000_000)]))
            sent += 3
        await asyncio.gather(*tasks)
        await wait_for(
            lambda: _ready(len(_alerts(rx, "firing")) >= 2 * n or None),
            timeout=20,
            what="all alerts",
        )
        # the leader goes away: the other takes over scanning without re-firing
        leader, other = (a, b) if a.scanner.is_leader else (b, a)
        await leader.stop()
        await wait_for(lambda: _true(other.scanner.is_leader), timeout=10, what="failover")
        scans = other.scanner.scans
        await wait_for(lambda: _true(other.scanner.scans >= scans + 3), what="scans after failover")
        fired = [a["labels"]["correlation_id"] for a in _alerts(rx, "firing")]
        assert (
            sorted(fired) == sorted({*fired}) and len(fired) == 2 * n
        )  # rep-* and noise-*: once each
        conn = await asyncpg.connect(db_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM spans") == sent
            assert await conn.fetchval("SELECT count(*) FROM alerts") == 2 * n
            states = dict(
                await conn.fetch("SELECT state, count(*) FROM correlations GROUP BY state")
            )
            assert states == {"stalled": 2 * n}
            steps = await conn.fetchval(
                "SELECT count(*) FROM correlations WHERE correlation_id LIKE 'rep-%' AND last_step = 'purchase.created'"
            )
            assert steps == n
        finally:
            await conn.close()


async def test_takeover_after_a_gap_judges_held_deadlines_by_span_times(
    make_collector, fast_spec: Path, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    """Nobody scanned for a minute (the collector was down) and the SDKs' held spans arrive
    after the new leader starts: on-time payments get no alert, a late one gets exactly one
    (fired at its deadline, resolved when done), one still stuck fires once the grace is over."""
    conn = await asyncpg.connect(db_url)
    try:
        await schema.migrate(conn, timedelta(days=7))
        await conn.execute(
            "INSERT INTO stall_scan (id, heartbeat) VALUES (1, now() - interval '60 seconds')"
        )
    finally:
        await conn.close()
    grace = 2.0
    async with Receiver() as rx:
        c = await make_collector(
            pipeline=fast_spec, alert_webhook_url=f"{rx.url}/hook", stall_grace=grace
        )
        await wait_for(lambda: _true(c.scanner.is_leader), what="leadership")
        assert c.scanner.hold is not None and c.scanner.hold_until is not None
        t0 = time.time_ns() - 30 * 10**9  # while nobody scanned
        ms = 1_000_000
        on_time = [step_span("held-ok", i, start_ns=t0 + i * 100 * ms) for i in range(4)]
        # purchase.created done 1 s after payment.confirmed: its 300 ms deadline was missed
        late = [step_span("held-late", 0, start_ns=t0)] + [
            step_span("held-late", i, start_ns=t0 + 1000 * ms + i * 100 * ms) for i in (1, 2, 3)
        ]
        stuck = [step_span("held-stuck", 0, start_ns=t0)]
        await _post(c, on_time + late + stuck)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
        try:
            held = await pool.fetchval("SELECT hold_until FROM stall_scan")
            assert held is not None and held.timestamp() > time.time()  # visible while held
            await wait_for(
                lambda: _ready(
                    len(_alerts(rx, "resolved")) >= 1 and len(_alerts(rx, "firing")) >= 2
                ),
                timeout=15,
                what="the late payment's and the stuck payment's alerts",
            )
            scans = c.scanner.scans
            await wait_for(lambda: _true(c.scanner.scans >= scans + 3), what="3 more scans")
            rows = {a.correlation_id: a for a in await store.alerts(pool)}
            assert set(rows) == {"held-late", "held-stuck"}  # held-ok was on time
            lt, st = rows["held-late"], rows["held-stuck"]
            assert lt.status == "resolved" and lt.step == "purchase.created"
            done = late[1][1].end_time_unix_nano / 1e9
            assert abs(lt.fired_at.timestamp() - (t0 / 1e9 + 0.005 + 0.3)) < 0.01  # the deadline
            assert abs(lt.resolved_at.timestamp() - done) < 0.01
            assert "after its deadline" in (lt.evidence or "")
            assert st.status == "firing" and st.step == "purchase.created"
            # the stuck one was held for the grace, not fired at the takeover
            assert c.scanner.hold is None
            assert await pool.fetchval("SELECT hold_until FROM stall_scan") is None
            held_until = st.fired_at.timestamp()
            started = (await pool.fetchval("SELECT min(first_seen) FROM correlations")).timestamp()
            assert held_until > started
            # each event once, the late one's firing before its resolution
            events = [
                (a["labels"]["correlation_id"], a["status"])
                for p in rx.webhook()
                for a in p["alerts"]
            ]
            assert sorted(events) == [
                ("held-late", "firing"),
                ("held-late", "resolved"),
                ("held-stuck", "firing"),
            ], events
            assert events.index(("held-late", "firing")) < events.index(("held-late", "resolved"))
        finally:
            await pool.close()


async def test_handover_without_a_gap_holds_nothing(make_collector, fast_spec: Path) -> None:  # type: ignore[no-untyped-def]
    a = await make_collector(pipeline=fast_spec, stall_grace=30.0)
    await wait_for(lambda: _true(a.scanner.is_leader), what="leadership")
    assert a.scanner.hold is None  # a fresh store: nobody scanned before, nothing was missed
    b = await make_collector(pipeline=fast_spec, stall_grace=30.0)
    await a.stop()  # the leader goes away; b takes over within a scan or two
    await wait_for(lambda: _true(b.scanner.is_leader), what="b leads")
    assert b.scanner.hold is None


def test_late_steps_judges_by_span_times_and_trusts_later_steps(spec_path: Path) -> None:
    from hoptrace.collector.stall_hold import late_steps
    from hoptrace.contract import load_spec

    spec = load_spec(spec_path)
    ids = [s.id for s in spec.steps]
    d1 = spec.steps[1].deadline
    t0 = 1_800_000_000_000_000  # µs
    since, until = us_to_dt(t0), us_to_dt(t0 + 3600 * 10**6)
    over = int(d1.total_seconds() * 10**6) + 5 * 10**6  # 5 s past the deadline

    def rec(*done: int | None) -> dict:  # type: ignore[type-arg]
        return {i: {"done_at": d} for i, d in zip(ids, done, strict=False) if d is not None}

    assert late_steps(spec, rec(t0 + 1, t0 + 2, t0 + 3, t0 + 4), since, until) == []
    (late,) = late_steps(spec, rec(t0 + 1, t0 + 1 + over), since, until)
    assert late == (ids[1], us_to_dt(t0 + 1) + d1, us_to_dt(t0 + 1 + over))
    # purchase.created's only span is a late redelivery's, but trainer.allocated was done on
    # time after it: the step was done by then, nobody was late
    assert late_steps(spec, rec(t0 + 1, t0 + 1 + over, t0 + 3), since, until) == []
    # a deadline outside the held window is not this judgement's business
    assert late_steps(spec, rec(t0 + 1, t0 + 1 + over), until, until) == []


async def test_deadlines_are_held_while_span_intake_is_behind(
    make_collector, fast_spec: Path, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    """The store stops taking spans (a lock on ``spans``), so the queue fills and senders get
    503s while a payment's on-time spans wait in it: no alert is fired for it meanwhile (nor a
    diagnosis run, which would read the store that is already behind). Once intake has caught up
    and the grace is over, the held deadlines are judged by span times: the on-time payment gets
    no alert, the payment that really stopped fires once."""
    grace = 1.0
    async with Receiver() as rx:
        c = await make_collector(
            pipeline=fast_spec,
            alert_webhook_url=f"{rx.url}/hook",
            stall_grace=grace,
            queue_max_spans=8,
        )
        await wait_for(lambda: _true(c.scanner.is_leader), what="leadership")
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=3)
        try:
            t0 = time.time_ns()
            await _post(
                c,
                [step_span("behind-ok", 0, start_ns=t0), step_span("behind-stuck", 0, start_ns=t0)],
            )
            await wait_for(
                lambda: pool.fetchval(
                    "SELECT count(*) FROM correlations WHERE correlation_id LIKE 'behind-%'"
                ),
                what="both payments tracked",
            )
            async with spans_locked(pool):  # the writers wait: intake backs up
                ms = 1_000_000
                # behind-ok's next steps, done well within their 300 ms deadlines, wait in the queue
                await _post(
                    c, [step_span("behind-ok", i, start_ns=t0 + i * 100 * ms) for i in (1, 2, 3)]
                )
                refused = 0
                async with httpx.AsyncClient() as h:
                    for i in range(50):  # fill the queue until the collector refuses (503)
                        body = request([step_span(f"fill-{i}", s, start_ns=t0) for s in range(4)])
                        r = await h.post(
                            f"http://127.0.0.1:{c.http_port}/v1/traces",
                            content=body.SerializeToString(),
                            headers=PB,
                        )
                        if r.status_code == 503:
                            refused += 1
                            break
                assert refused, "the queue never filled"
                # well past both deadlines, several scans run while intake is behind
                scans = c.scanner.scans
                await wait_for(
                    lambda: _true(c.scanner.scans >= scans + 5 and time.time_ns() > t0 + 1000 * ms),
                    what="scans past the deadlines",
                )
                assert await pool.fetchval("SELECT count(*) FROM alerts") == 0, "fired while behind"
                assert c.scanner.hold is not None
            fired = await wait_for(
                lambda: _ready(_alerts(rx, "firing")), timeout=15, what="the stuck payment's alert"
            )
            scans = c.scanner.scans
            await wait_for(lambda: _true(c.scanner.scans >= scans + 3), what="3 more scans")
            rows = {a.correlation_id: a for a in await store.alerts(pool)}
            assert set(rows) == {"behind-stuck"}, rows  # behind-ok was on time by its spans
            assert [a["labels"]["correlation_id"] for a in fired] == ["behind-stuck"]
            assert rows["behind-stuck"].step == "purchase.created"
            assert c.scanner.hold is None
            state = await pool.fetchval(
                "SELECT state FROM correlations WHERE correlation_id = 'behind-ok'"
            )
            assert state == "completed"
        finally:
            await pool.close()


async def test_a_hold_for_intake_behind_is_bounded(spec_path: Path, db_url: str) -> None:
    """Intake that stays behind does not silence the scan for good: the hold grows with each
    scan until BEHIND_MAX_HOLD, then deadlines are judged again; a new hold can start only after
    intake has caught up once."""
    from hoptrace.collector.stall_hold import BEHIND_MAX_HOLD
    from hoptrace.collector.stalls import StallScanner
    from hoptrace.contract import load_spec

    state = {"behind": True}
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await schema.migrate(conn, timedelta(days=7))
            await conn.execute("INSERT INTO stall_scan (id, heartbeat) VALUES (1, now())")
            s = StallScanner(
                db_url, pool, 1.0, spec=load_spec(spec_path), grace=10.0,
                behind=lambda: state["behind"],
            )  # fmt: skip
            t = await conn.fetchval("SELECT now()")
            await s._hold_while_behind(conn, t)
            assert s.hold is not None and s.hold_until == t + timedelta(seconds=10)
            start = s.hold[0]
            assert start == t - timedelta(seconds=1)
            stored = await conn.fetchval("SELECT hold_until FROM stall_scan")
            assert stored == s.hold_until
            await s._hold_while_behind(conn, t + timedelta(seconds=30))  # still behind: extended
            assert s.hold == (start, t + timedelta(seconds=40))
            await s._hold_while_behind(conn, t + BEHIND_MAX_HOLD * 2)  # behind for too long
            assert s.hold == (start, start + BEHIND_MAX_HOLD)
            assert s.hold_until == start + BEHIND_MAX_HOLD
            s.hold = s.hold_until = None  # the capped hold was judged and ended
            await s._hold_while_behind(conn, t + BEHIND_MAX_HOLD * 3)
            assert s.hold is None  # still behind: no new hold
            state["behind"] = False
            await s._hold_while_behind(conn, t + BEHIND_MAX_HOLD * 4)  # caught up once
            state["behind"] = True
            later = t + BEHIND_MAX_HOLD * 5
            await s._hold_while_behind(conn, later)
            assert s.hold == (later - timedelta(seconds=1), later + timedelta(seconds=10))
    finally:
        await pool.close()

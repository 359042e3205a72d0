"""Scale-out on the Kafka span source: two ``hoptrace collector`` processes in one consumer group
on the span topic, one store. The stall-scan leader is SIGKILLed mid-way (its consumer never says
goodbye, its uncommitted records are read again): the survivor takes its partitions and the scan
lease, every payment's spans are stored once, its correlation state is right, and a stalled
payment alerts exactly once, whichever replica led when it stalled."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from benchmarks.otlp_fuzz import CollectorProc
from hoptrace.collector.kafka_facts import assigned
from hoptrace.collector.state import StepObs, fold
from hoptrace.contract import load_spec

from ..support import REFERENCE_SPEC, create_topics, delete_topics, wait_for
from .helpers import request, step_span
from .receiver import Receiver

PARTITIONS = 4
#: Every step of the reference pipeline done (``correlations.done_mask``).
ALL_STEPS = 0b1111


@pytest.fixture
def spec_60s(spec_path: Path) -> Path:
    """The reference pipeline with 60 s deadlines: spans a rebalance holds up for ~10 s stall
    nothing; only the payments written two minutes in the past are overdue."""
    out = spec_path.with_name("slow-" + spec_path.name)
    out.write_text(re.sub(r'deadline = "[^"]+"', 'deadline = "60s"', spec_path.read_text()))
    return out


class Topic:
    """The span topic and a producer writing one record per step span (each service exports
    its own), round-robin over the partitions: one payment's steps land on different partitions,
    so both collectors fold into the same correlation rows."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.name = name
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        self.records = 0
        self.sent = 0  # spans

    async def payment(
        self, cid: str, steps: range, *, age_s: float = 0.0, one_record: bool = False
    ) -> None:
        """Step spans of ``cid``, a record each (or all in one, as an OpenTelemetry Collector's
        batch of several services' spans)."""
        start = time.time_ns() - int(age_s * 1e9)
        trace = os.urandom(16)
        spans = [step_span(cid, i, start_ns=start + i * 10_000_000, trace_id=trace) for i in steps]
        for batch in [spans] if one_record else [[s] for s in spans]:
            await self.producer.send_and_wait(
                self.name, request(batch).SerializeToString(), partition=self.records % PARTITIONS
            )
            self.records += 1
            self.sent += len(batch)


@pytest.fixture
async def span_topic(kafka_bootstrap: str, suffix: str) -> AsyncIterator[Topic]:
    name = f"otlp-spans-{suffix}"
    await create_topics(kafka_bootstrap, [name], partitions=PARTITIONS)
    topic = Topic(kafka_bootstrap, name)
    await topic.producer.start()
    try:
        yield topic
    finally:
        await topic.producer.stop()
        await delete_topics(kafka_bootstrap, [name])


async def _ready(value: object) -> object:
    return value or None


def _pid(col: CollectorProc) -> int:
    assert col.proc is not None
    return col.proc.pid


async def test_two_collectors_share_the_span_topic_and_survive_a_killed_leader(
    db_url: str, kafka_bootstrap: str, suffix: str, spec_60s: Path, span_topic: Topic,
    tmp_path: Path,
) -> None:  # fmt: skip
    group = f"hoptrace-collector-{suffix}"
    env = {
        "HOPTRACE_SPAN_TOPIC": span_topic.name,
        "HOPTRACE_SPAN_GROUP": group,
        "HOPTRACE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "HOPTRACE_STALL_SCAN_INTERVAL": "0.2",  # the lease: 3 s
        "HOPTRACE_STALL_GRACE": "0",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    conn = await asyncpg.connect(db_url)
    async with Receiver() as rx:
        env["HOPTRACE_ALERT_WEBHOOK_URL"] = f"{rx.url}/hook"
        procs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            procs.append(CollectorProc(db_url, spec_60s, tmp_path / name, extra_env=env))
        try:
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))

            async def members() -> list[tuple[int, ...]]:
                resp = await admin.describe_consumer_groups([group])
                return [m.partitions for m in assigned(resp, span_topic.name)]

            async def both_assigned() -> object:
                return len(await members()) == 2

            await wait_for(both_assigned, timeout=30, what="both collectors in the group")

            async def leader() -> str | None:
                return await conn.fetchval("SELECT leader FROM stall_scan WHERE id = 1")

            await wait_for(leader, timeout=15, what="a stall-scan leader")
            holder = await leader()
            assert holder is not None
            victim = next(p for p in procs if f":{_pid(p)}:" in holder)
            survivor = next(p for p in procs if p is not victim)

            # while both run: healthy payments, one overdue (stalled) and one half-way
            healthy = [f"ok-{suffix}-{k}" for k in range(24)]
            for cid in healthy[:12]:
                await span_topic.payment(cid, range(4))
            stalled_before = f"stall-before-{suffix}"
            await span_topic.payment(stalled_before, range(2), age_s=120, one_record=True)
            straddler = f"straddle-{suffix}"
            await span_topic.payment(straddler, range(2))

            async def stored() -> int:
                return int(await conn.fetchval("SELECT count(*) FROM spans"))

            async def all_stored() -> object:
                return await stored() == span_topic.sent

            await wait_for(all_stored, timeout=30, what="the first spans from both collectors")
            async with httpx.AsyncClient(timeout=5) as http:  # both consumed and wrote
                for p in procs:
                    text = (await http.get(f"{p.http}/metrics")).text
                    n = re.search(r"^hoptrace_spans_stored_total (\S+)$", text, re.M)
                    assert n is not None and float(n.group(1)) > 0, (p.log, text[:500])

            def fired(cid: str) -> int:
                return sum(
                    1
                    for p in rx.webhook("firing")
                    for a in p["alerts"]
                    if a["labels"]["correlation_id"] == cid
                )

            await wait_for(
                lambda: _ready(fired(stalled_before)), timeout=30, what="the first stall alert"
            )

            # the leader dies mid-way: SIGKILL, its consumer and lease left to expire
            await span_topic.payment(healthy[12], range(4))  # maybe read, maybe not committed
            os.kill(_pid(victim), signal.SIGKILL)
            killed = time.monotonic()
            for cid in healthy[13:]:
                await span_topic.payment(cid, range(4))
            await span_topic.payment(straddler, range(2, 4))
            stalled_after = f"stall-after-{suffix}"
            await span_topic.payment(stalled_after, range(2), age_s=120, one_record=True)

            async def survivor_leads() -> object:
                return f":{_pid(survivor)}:" in (await leader() or "")

            await wait_for(survivor_leads, timeout=20, what="the survivor takes the lease")
            took = time.monotonic() - killed

            async def survivor_has_all() -> object:
                parts = await members()
                return len(parts) == 1 and sorted(parts[0]) == list(range(PARTITIONS))

            await wait_for(survivor_has_all, timeout=30, what="the survivor takes every partition")
            moved = time.monotonic() - killed
            await wait_for(all_stored, timeout=30, what="every span, the killed one's included")
            print(f"lease taken over {took:.1f}s, partitions {moved:.1f}s after the SIGKILL")
            assert took < 10, f"takeover took {took:.1f}s"

            await wait_for(
                lambda: _ready(fired(stalled_after)), timeout=30, what="the survivor's alert"
            )
            # ten more scans by the survivor: nothing fires twice
            beats, last = 0, await conn.fetchval("SELECT heartbeat FROM stall_scan")

            async def scanned_on() -> bool:
                nonlocal beats, last
                now = await conn.fetchval("SELECT heartbeat FROM stall_scan")
                if now != last:
                    beats, last = beats + 1, now
                return beats >= 10

            await wait_for(scanned_on, timeout=30, what="10 more scans")

            assert await stored() == span_topic.sent  # each span once (duplicates ignored)
            rows = {
                r["correlation_id"]: r
                for r in await conn.fetch(
                    "SELECT correlation_id, state, done_mask, next_step FROM correlations"
                )
            }
            for cid in [*healthy, straddler]:
                assert rows[cid]["state"] == "completed", (cid, dict(rows[cid]))
                assert rows[cid]["done_mask"] == ALL_STEPS, (cid, dict(rows[cid]))
            for cid in (stalled_before, stalled_after):
                assert rows[cid]["state"] == "stalled", dict(rows[cid])
                assert rows[cid]["next_step"] == "trainer.allocated"
                assert fired(cid) == 1, rx.webhook("firing")
            firing = await conn.fetch(
                "SELECT correlation_id, count(*) AS n FROM alerts GROUP BY 1 ORDER BY 1"
            )
            assert {r["correlation_id"]: r["n"] for r in firing} == {
                stalled_after: 1,
                stalled_before: 1,
            }
            assert survivor.alive() and not victim.alive()
        finally:
            await conn.close()
            await admin.close()
            codes = await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs if p.alive()))
            assert all(c == 0 for c in codes), [p.tail() for p in procs]


def test_a_late_span_of_an_earlier_step_keeps_the_stall_at_a_later_step() -> None:
    """With spans on several partitions (several collectors, or one catching up), a payment's
    purchase.created span can be stored before its payment.confirmed span. If trainer.allocated
    is overdue meanwhile, the scan stalls the payment there; the late payment.confirmed span does
    not move it on, so its alert should stay firing (one alert for one stall)."""
    spec = load_spec(REFERENCE_SPEC)
    now = datetime.now(UTC)
    t = int((now - timedelta(minutes=2)).timestamp() * 1e6)
    row = fold(spec, None, [StepObs("late", "purchase.created", t + 10_000, t + 15_000, "ok")], now)
    assert row["next_step"] == "trainer.allocated" and row["next_deadline"] < now
    row["state"] = "stalled"  # what the scan does (and it fires the alert)
    after = fold(spec, row, [StepObs("late", "payment.confirmed", t, t + 5_000, "ok")], now)
    assert after["next_step"] == "trainer.allocated" and after["next_deadline"] < now
    assert after["state"] == "stalled" and not after["resolved"], after["state"]


async def test_a_late_earlier_step_span_fires_no_second_alert_through_the_collector(
    db_url: str, spec_60s: Path, tmp_path: Path, suffix: str
) -> None:
    """The same through a real ``hoptrace collector``: purchase.created arrives first and its
    payment stalls at trainer.allocated (one alert); the late payment.confirmed span changes
    nothing (the alert stays firing, no resolve and no second alert over ten more scans); the
    overdue step done then resolves it."""
    cid = f"late-{suffix}"
    trace = os.urandom(16)
    start = time.time_ns() - 120 * 1_000_000_000  # trainer.allocated (60 s) long overdue
    env = {"HOPTRACE_STALL_SCAN_INTERVAL": "0.2", "HOPTRACE_STALL_GRACE": "0"}
    conn = await asyncpg.connect(db_url)
    async with Receiver() as rx, httpx.AsyncClient(timeout=5) as http:
        env["HOPTRACE_ALERT_WEBHOOK_URL"] = f"{rx.url}/hook"
        col = CollectorProc(db_url, spec_60s, tmp_path, extra_env=env)
        await asyncio.to_thread(col.start)
        try:

            async def post(step: int, start_ns: int) -> None:
                body = request([step_span(cid, step, start_ns=start_ns, trace_id=trace)])
                r = await http.post(
                    f"{col.http}/v1/traces",
                    content=body.SerializeToString(),
                    headers={"content-type": "application/x-protobuf"},
                )
                assert r.status_code == 200, r.text

            def posted(status: str) -> int:
                return sum(
                    1
                    for p in rx.webhook(status)
                    for a in p["alerts"]
                    if a["labels"]["correlation_id"] == cid
                )

            async def steps_done() -> set[str]:
                raw = await conn.fetchval(
                    "SELECT steps FROM correlations WHERE correlation_id = $1", cid
                )
                steps = orjson.loads(raw) if raw else {}
                return {k for k, v in steps.items() if v["done_at"] is not None}

            await post(1, start + 10_000_000)  # purchase.created first
            await wait_for(lambda: _ready(posted("firing")), timeout=30, what="the stall alert")

            await post(0, start)  # payment.confirmed, late

            async def late_folded() -> bool:
                return "payment.confirmed" in await steps_done()

            await wait_for(late_folded, timeout=30, what="the late span folded")
            beats, last = 0, await conn.fetchval("SELECT heartbeat FROM stall_scan")

            async def scanned_on() -> bool:
                nonlocal beats, last
                now = await conn.fetchval("SELECT heartbeat FROM stall_scan")
                if now != last:
                    beats, last = beats + 1, now
                return beats >= 10

            await wait_for(scanned_on, timeout=30, what="10 more scans")
            row = await conn.fetchrow(
                "SELECT state, next_step FROM correlations WHERE correlation_id = $1", cid
            )
            assert (row["state"], row["next_step"]) == ("stalled", "trainer.allocated")
            alerts = await conn.fetch(
                "SELECT step, status FROM alerts WHERE correlation_id = $1", cid
            )
            assert [tuple(a) for a in alerts] == [("trainer.allocated", "firing")]
            assert posted("firing") == 1 and posted("resolved") == 0, rx.webhook()

            await post(2, time.time_ns())  # the overdue step done: the stall is over
            await wait_for(lambda: _ready(posted("resolved")), timeout=30, what="the resolve")
            alerts = await conn.fetch(
                "SELECT step, status FROM alerts WHERE correlation_id = $1", cid
            )
            assert [tuple(a) for a in alerts] == [("trainer.allocated", "resolved")]
            assert posted("firing") == 1
        finally:
            await conn.close()
            code = await asyncio.to_thread(col.stop)
            assert code == 0, col.tail()

"""End to end on the real stack, one test per cause: a fault switched on leaves a payment stuck,
the fault is switched off, ``hoptrace redrive ID --apply`` sends it on, and the payment
completes with exactly one row in every business table and the redrive's trace linked to the
original; a second redrive sends nothing. Then ``--stuck`` over 50 payments stuck at one step
while its worker was down and their records gone from the topic (deleted and recreated empty):
all complete, none twice.

One stack (collector + reference services, with the redrive route on) serves the module."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from hoptrace.collector import api
from tests.diagnosis.test_e2e_causes import (
    DEADLINE_S,
    Stack,
    ensure_running,
    healthy,
    make_stack,
    teardown,
)
from tests.support import create_topics, delete_topics, free_port, wait_for

from .stack import (
    TOKEN,
    actions,
    assert_linked,
    assert_one_row_each,
    dry_run,
    redrive,
    redrive_token,
    second_redrive_sends_nothing,
    sent_actions,
    trace_text,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pipe(
    admin_db_url: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with redrive_token():
        s, name = make_stack(admin_db_url, kafka_bootstrap, tmp_path_factory.mktemp("redrive"))
    try:
        s.services.start_all()
        yield s
    finally:
        teardown(s, admin_db_url, name)


@pytest.fixture(autouse=True)
async def _close_api() -> None:
    yield
    await api.close()


async def recreate_empty(stack: Stack, topic: str) -> None:
    """Delete ``topic`` and create it again, empty (its records are gone)."""
    await delete_topics(stack.bootstrap, [topic])

    async def gone() -> bool:
        try:
            await create_topics(stack.bootstrap, [topic], stack.spec.partitions)
        except Exception:  # noqa: BLE001 - still being deleted
            return False
        return True

    await wait_for(gone, timeout=30, interval=0.3, what=f"{topic} recreated")


async def redriven(stack: Stack, cid: str, origin: set[str] | None = None) -> dict:
    """``redrive ID --apply`` sent one record; the payment completes, one row per table, the
    traces linked; a second redrive sends nothing."""
    before = await api.diagnose(cid, settings=stack.settings(), spec=stack.spec)
    code, report = redrive(stack, cid)
    assert code == 0, report
    sent = sent_actions(report)
    assert len(sent) == 1, report
    await stack.wait_cause(cid, "completed", timeout=60)
    await assert_one_row_each(stack, cid)
    await assert_linked(stack, cid, sent[0], origin or set(before.trace_ids))
    await second_redrive_sends_nothing(stack, cid)
    return report


# ------------------------------------------------------------------------------------ causes


async def test_completed_has_nothing_to_do(pipe: Stack) -> None:
    healthy(pipe)
    cid = pipe.pay()
    await pipe.wait_cause(cid, "completed")
    code, report = redrive(pipe, cid)
    assert code == 0 and [a["kind"] for a in actions(report)] == ["nothing"], report


async def test_no_consumer_waits_while_the_record_is_in_its_topic_then_reemits(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.stop("session-worker")
    cid = stack.pay()
    await stack.wait_cause(cid, "no_consumer", at="session.created")
    code, dry = redrive(stack, cid, apply=False)
    (act,) = actions(dry)
    assert code == 0 and act["kind"] == "wait" and "will flow once" in act["description"], dry
    # Kafka unreadable: the diagnosis says missing_evidence, and redrive refuses to guess
    blind = {"HOPTRACE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    code, refused = redrive(stack, cid, env=blind)
    assert len(actions(refused)) == 1, refused
    (act,) = actions(refused)
    assert code == 1 and act["kind"] == "refuse", refused
    assert "evidence missing (kafka" in act["description"], act
    assert "does not act on a guess" in act["description"], act
    assert refused["summary"]["sent"] == 0
    # the record leaves its topic (deleted and recreated empty): re-emitted from the event
    # allocation-worker stored in its ledger
    topic = stack.spec.step("session.created").consumes
    await recreate_empty(stack, topic)
    code, dry = await dry_run(stack, cid)
    (act,) = actions(dry)
    assert act["kind"] == "reemit_stored", dry
    assert act["record_from"] == "processed_events.emitted of trainer.allocated", act
    assert act["to_topic"] == topic and act["result"] is None, act
    origin = set((await api.diagnose(cid, settings=stack.settings(), spec=stack.spec)).trace_ids)
    code, report = redrive(stack, cid)
    assert code == 0 and len(sent_actions(report)) == 1, report
    # while the worker is down the record waits: a second redrive sends nothing (in flight)
    code, again = redrive(stack, cid)
    assert code == 0 and [a["kind"] for a in actions(again)] == ["in_flight"], again
    stack.services.start("session-worker")
    await stack.wait_cause(cid, "completed", timeout=60)
    await assert_one_row_each(stack, cid)
    await assert_linked(stack, cid, sent_actions(report)[0], origin)
    await second_redrive_sends_nothing(stack, cid)
    # `hoptrace trace` lists the redrives under their step
    out = trace_text(stack, cid)
    audit_id = sent_actions(report)[0]["audit_id"]
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "session.created" in line and "done" in line)
    below = "\n".join(lines[at + 1 : at + 6])
    assert f"redrive #{audit_id} by test" in below and "reemit_stored (no_consumer)" in below, out


async def test_in_progress_sends_nothing_and_the_payment_flows_on(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.env["HOPTRACE_SLOW_DELAY_S"] = str(DEADLINE_S * 2)
    try:
        ensure_running(stack, "allocation-worker", "slow")
    finally:
        stack.services.env.pop("HOPTRACE_SLOW_DELAY_S")
    cid = stack.pay()
    await stack.wait_cause(cid, "in_progress", timeout=DEADLINE_S * 2, at="trainer.allocated")
    code, report = redrive(stack, cid)
    (act,) = actions(report)
    assert code == 0 and act["kind"] == "wait" and report["summary"]["sent"] == 0, report
    assert act["result"] == "waiting"  # audited, nothing sent
    await stack.wait_cause(cid, "completed", timeout=DEADLINE_S * 6)
    await assert_one_row_each(stack, cid)
    await second_redrive_sends_nothing(stack, cid)
    ensure_running(stack, "allocation-worker")


async def test_topic_missing_refuses_until_it_exists_then_reemits(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    stack.services.stop("session-worker")
    cid = stack.pay()
    await stack.wait_cause(cid, "no_consumer", at="session.created")
    topic = stack.spec.step("session.created").consumes
    await delete_topics(stack.bootstrap, [topic])
    await stack.wait_cause(cid, "topic_missing", at="session.created")
    code, dry = redrive(stack, cid, apply=False)
    (act,) = actions(dry)
    assert code == 1 and act["kind"] == "refuse" and "does not exist" in act["description"], dry
    # fixed: the topic exists again (empty) and the worker runs
    await recreate_empty(stack, topic)
    stack.services.start("session-worker")
    await redriven(stack, cid)


async def test_downstream_error_republishes_the_dead_lettered_record(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "http-500")
    cid = stack.pay()
    await stack.wait_cause(cid, "downstream_error", timeout=60)
    ensure_running(stack, "admin-service")
    code, dry = await dry_run(stack, cid)
    (act,) = actions(dry)
    assert act["kind"] == "republish_dead_letter", dry
    assert act["record_from"].startswith(stack.spec.step("trainer.allocated").dlq), act
    await redriven(stack, cid)


async def test_processing_error_republishes_the_dead_lettered_record(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "silent-no-write")
    cid = stack.pay()
    await stack.wait_cause(cid, "processing_error", timeout=60)
    ensure_running(stack, "admin-service")
    await redriven(stack, cid)


async def test_marked_without_effect_removes_the_mark_and_republishes(pipe: Stack) -> None:
    stack = pipe
    healthy(stack)
    ensure_running(stack, "admin-service", "silent-no-write")
    ensure_running(stack, "allocation-worker", "no-verify")
    cid = stack.pay()
    await stack.wait_cause(cid, "marked_without_effect")
    ensure_running(stack, "admin-service")
    ensure_running(stack, "allocation-worker")
    code, dry = await dry_run(stack, cid)
    (act,) = actions(dry)
    assert act["kind"] == "republish_input" and "processed_events mark" in act["removes_mark"]
    await redriven(stack, cid)


async def test_consumed_without_trace_republishes_the_input_record(pipe: Stack) -> None:
    """Through the collector's redrive route (the dashboard's path): dry run, then apply."""
    stack = pipe
    healthy(stack)
    stack.services.stop("purchase-worker")
    stack.services.env["OTEL_SDK_DISABLED"] = "true"
    try:
        stack.services.start("purchase-worker")
    finally:
        stack.services.env.pop("OTEL_SDK_DISABLED")
    stack.services.faults["purchase-worker"] = "uninstrumented"
    cid = stack.pay()
    await stack.wait_cause(cid, "consumed_without_trace", timeout=DEADLINE_S * 6)
    ensure_running(stack, "purchase-worker")
    origin = set((await api.diagnose(cid, settings=stack.settings(), spec=stack.spec)).trace_ids)
    url = f"http://127.0.0.1:{stack.env['HOPTRACE_OTLP_HTTP_PORT']}/redrive"
    async with httpx.AsyncClient(timeout=60) as client:
        denied = await client.post(url, json={"id": cid, "apply": True})
        assert denied.status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        dry = await client.post(url, json={"id": cid}, headers=auth)
        assert dry.status_code == 200, dry.text
        (act,) = actions(dry.json())
        assert act["kind"] == "republish_input" and act["result"] is None, act
        done = await client.post(url, json={"id": cid, "apply": True, "who": "t"}, headers=auth)
        assert done.status_code == 200, done.text
    sent = sent_actions(done.json())
    assert len(sent) == 1, done.json()
    await stack.wait_cause(cid, "completed", timeout=60)
    await assert_one_row_each(stack, cid)
    await assert_linked(stack, cid, sent[0], origin)
    await second_redrive_sends_nothing(stack, cid)


async def test_not_emitted_reemits_from_the_outbox(pipe: Stack) -> None:
    """payment-service's ``skip-emit`` stores its event in the outbox, marked sent, and never
    emits it (the service believes it did): redrive re-emits it from the outbox."""
    stack = pipe
    healthy(stack)
    ensure_running(stack, "payment-service", "skip-emit")
    cid = stack.pay()
    await stack.wait_cause(cid, "not_emitted")
    ensure_running(stack, "payment-service")
    code, dry = await dry_run(stack, cid)
    (act,) = actions(dry)
    assert act["kind"] == "reemit_stored" and act["record_from"].startswith("payment_outbox")
    await redriven(stack, cid)


# ------------------------------------------------------------------------------------ batch


async def test_stuck_batch_after_the_worker_was_down_and_the_topic_recreated(pipe: Stack) -> None:
    """50 payments stuck at session.created while session-worker was down; their records are
    gone (topic deleted and recreated empty); the worker runs again (consumer_lag): one
    ``--stuck`` redrive re-emits each from allocation-worker's ledger: all complete, none twice."""
    stack = pipe
    healthy(stack)
    stack.services.stop("session-worker")
    port = stack.env["HOPTRACE_PAYMENT_SERVICE_PORT"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

        async def pay(i: int) -> str:
            body = {"student": f"student-{i % 100 + 1}", "course": "course-2", "amount": "10.00"}
            res = await client.post("/payments", json=body)
            assert res.status_code == 201, res.text
            return res.json()["payment_id"]

        cids = await asyncio.gather(*(pay(i) for i in range(50)))
    conn = await asyncpg.connect(stack.db_url)
    try:

        async def allocated() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM trainer_allocations WHERE correlation_id = ANY($1)", cids
            )
            return n == 50

        await wait_for(allocated, timeout=60, interval=0.3, what="50 allocations")
        topic = stack.spec.step("session.created").consumes
        await recreate_empty(stack, topic)
        stack.services.start("session-worker")

        async def listed() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM correlations WHERE correlation_id = ANY($1) "
                "AND state = 'stalled'",
                cids,
            )
            return n == 50

        await wait_for(listed, timeout=60, interval=0.5, what="50 stalled")
        await stack.wait_cause(cids[0], "consumer_lag", at="session.created")
        t0 = time.monotonic()
        code, report = redrive(stack, "--stuck", "--step", "session.created", "--limit", "200")
        took = time.monotonic() - t0
        mine = [p for p in report["payments"] if p["correlation_id"] in set(cids)]
        assert code == 0 and len(mine) == 50, report["summary"]
        assert all(len(sent_actions({"payments": [p]})) == 1 for p in mine), report
        print(f"redrive --stuck of 50 payments: {took:.1f}s")

        async def sessions() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM tutoring_sessions WHERE correlation_id = ANY($1)", cids
            )
            return n == 50

        await wait_for(sessions, timeout=90, interval=0.5, what="50 sessions")
        runs = await conn.fetch(
            "SELECT correlation_id, count(*) AS n FROM processed_events "
            "WHERE correlation_id = ANY($1) AND source = 'session.created' GROUP BY 1",
            cids,
        )
        assert len(runs) == 50 and all(r["n"] == 1 for r in runs)
        sent = await conn.fetchval(
            "SELECT count(*) FROM redrives WHERE correlation_id = ANY($1) AND result = 'sent'", cids
        )
        assert sent == 50
        for cid in cids[:3]:
            await stack.wait_cause(cid, "completed", timeout=60)
            await assert_one_row_each(stack, cid)
    finally:
        await conn.close()
    # nothing is stuck any more: a second --stuck redrive sends none of them
    code, again = redrive(stack, "--stuck", "--step", "session.created")
    assert code == 0
    assert not [p for p in again["payments"] if p["correlation_id"] in set(cids)], again
    assert json.dumps(again)  # a valid report

"""Each fault switch produces the state it claims, on the real services."""

from __future__ import annotations

import httpx
import pytest

from hoptrace.workers.registry import validate_fault
from tests.support import wait_for

from .conftest import Pipeline
from .harness import committed, count, fetchval, group_members, header, read_topic


async def _dlq_has(p: Pipeline, topic: str, cid: str) -> object:
    for r in await read_topic(p.bootstrap, topic + ".dlq", timeout_ms=500):
        if header(r, "x-correlation-id") == cid:
            return r
    return None


async def _processed(p: Pipeline, cid: str, step: str) -> int:
    return await fetchval(
        p.db_url,
        "SELECT count(*) FROM processed_events WHERE correlation_id = $1 AND source = $2",
        cid,
        step,
    )


def test_fault_names_are_validated() -> None:
    assert validate_fault("admin-service", "http-500") == "http-500"
    assert validate_fault("purchase-worker", None) is None
    with pytest.raises(
        ValueError, match="allowed: no-verify, wrong-group, slow, crash-after-write"
    ):
        validate_fault("allocation-worker", "http-500")
    with pytest.raises(ValueError, match="no fault switches"):
        validate_fault("collector", "slow")


async def test_admin_silent_no_write_with_verification_retries_then_dlq(running: Pipeline) -> None:
    running.services.restart("admin-service", "silent-no-write")
    cid = running.pay()
    topic = running.topic("trainer.allocated")
    record = await wait_for(lambda: _dlq_has(running, topic, cid), timeout=30, what="DLQ record")
    assert "effect missing" in (header(record, "x-dlq-reason") or "")
    assert int(header(record, "x-dlq-attempts") or 0) > 1
    assert await _processed(running, cid, "trainer.allocated") == 0
    assert await count(running.db_url, "trainer_allocations", cid) == 0
    assert await count(running.db_url, "tutoring_sessions", cid) == 0
    assert await count(running.db_url, "student_course_purchases", cid) == 1


async def test_admin_http_500_retries_then_dlq(running: Pipeline) -> None:
    running.services.restart("admin-service", "http-500")
    cid = running.pay()
    topic = running.topic("trainer.allocated")
    record = await wait_for(lambda: _dlq_has(running, topic, cid), timeout=30, what="DLQ record")
    assert "500" in (header(record, "x-dlq-reason") or "")
    assert await _processed(running, cid, "trainer.allocated") == 0
    assert await count(running.db_url, "trainer_allocations", cid) == 0


async def test_no_verify_marks_processed_without_the_allocation_row(running: Pipeline) -> None:
    running.services.restart("admin-service", "silent-no-write")
    running.services.restart("allocation-worker", "no-verify")
    cid = running.pay()
    await wait_for(
        lambda: _processed(running, cid, "trainer.allocated"), timeout=30, what="processed mark"
    )
    assert await count(running.db_url, "trainer_allocations", cid) == 0
    assert await _dlq_has(running, running.topic("trainer.allocated"), cid) is None


async def test_wrong_group_leaves_the_real_group_without_members(running: Pipeline) -> None:
    running.services.restart("allocation-worker", "wrong-group")
    real = running.group("trainer.allocated")
    topic = running.topic("trainer.allocated")
    before = await committed(running.bootstrap, real, topic)
    cid = running.pay()

    async def wrong_group_span() -> bool:
        return any(
            s.name == "trainer.allocated"
            and s.attributes.get("messaging.consumer.group.name") == real + "-v2"
            for s in running.otlp.for_correlation(cid)
        )

    await wait_for(wrong_group_span, timeout=30, what="record consumed under the wrong group")
    assert await group_members(running.bootstrap, real) == 0
    assert await group_members(running.bootstrap, real + "-v2") >= 1
    assert await committed(running.bootstrap, real, topic) == before


async def test_slow_allocation_worker_lags(running: Pipeline) -> None:
    from hoptrace.workers.faults import slow_delay_s

    SLOW_DELAY_S = slow_delay_s()
    running.services.restart("allocation-worker", "slow")
    cid = running.pay()
    await wait_for(
        lambda: count(running.db_url, "trainer_allocations", cid), timeout=30, what="allocation"
    )
    gap = await fetchval(
        running.db_url,
        """SELECT extract(epoch FROM a.created_at - p.created_at)
           FROM trainer_allocations a JOIN student_course_purchases p USING (correlation_id)
           WHERE correlation_id = $1""",
        cid,
    )
    assert float(gap) >= SLOW_DELAY_S


async def test_skip_emit_writes_the_payment_and_never_emits(running: Pipeline) -> None:
    # the event is stored (the outbox row, marked sent as if emitted: what redrive re-emits)
    running.services.restart("payment-service", "skip-emit")
    skipped = running.pay()
    assert await count(running.db_url, "payments", skipped) == 1
    assert (
        await fetchval(
            running.db_url,
            "SELECT count(*) FROM payment_outbox WHERE correlation_id = $1 AND sent_at IS NOT NULL",
            skipped,
        )
        == 1
    )
    running.services.restart("payment-service")
    later = running.pay()
    await wait_for(
        lambda: count(running.db_url, "tutoring_sessions", later), timeout=30, what="later payment"
    )
    assert await count(running.db_url, "student_course_purchases", skipped) == 0


async def test_crash_after_write_then_restart_completes_with_one_row(running: Pipeline) -> None:
    svc = running.services
    svc.restart("purchase-worker", "crash-after-write")
    cid = running.pay()
    proc = svc.procs["purchase-worker"]

    async def exited() -> bool:
        return proc.poll() is not None

    await wait_for(exited, timeout=30, what="purchase-worker to crash after its write")
    assert proc.returncode == 17
    assert await count(running.db_url, "student_course_purchases", cid) == 1
    assert await count(running.db_url, "trainer_allocations", cid) == 0
    svc.procs.pop("purchase-worker")
    svc.start("purchase-worker")
    await wait_for(
        lambda: count(running.db_url, "tutoring_sessions", cid), timeout=30, what="chain completes"
    )
    for table in ("student_course_purchases", "trainer_allocations", "tutoring_sessions"):
        assert await count(running.db_url, table, cid) == 1, table


async def test_payment_service_crash_after_commit_is_emitted_by_the_outbox(
    running: Pipeline,
) -> None:
    svc = running.services
    svc.restart("payment-service", "crash-after-write")
    port = running.env["HOPTRACE_PAYMENT_SERVICE_PORT"]
    before = await fetchval(running.db_url, "SELECT count(*) FROM payments")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(
                "/payments", json={"student": "student-2", "course": "course-2", "amount": "10"}
            )
    proc = svc.procs.pop("payment-service")
    proc.wait(10)
    assert proc.returncode == 17
    cid = await fetchval(
        running.db_url, "SELECT payment_id FROM payments ORDER BY created_at DESC LIMIT 1"
    )
    assert await fetchval(running.db_url, "SELECT count(*) FROM payments") == before + 1
    svc.start("payment-service")
    await wait_for(
        lambda: count(running.db_url, "tutoring_sessions", cid), timeout=30, what="chain completes"
    )
    assert await count(running.db_url, "student_course_purchases", cid) == 1

"""Happy path: one payment ends with exactly one row in each table and one connected trace
across payment-service, the three workers and admin-service."""

from __future__ import annotations

from tests.support import wait_for

from .conftest import Pipeline
from .harness import count, fetchval

TABLES = ["payments", "student_course_purchases", "trainer_allocations", "tutoring_sessions"]
SERVICES = {
    "payment-service",
    "purchase-worker",
    "allocation-worker",
    "admin-service",
    "session-worker",
}
STEPS = ["payment.confirmed", "purchase.created", "trainer.allocated", "session.created"]


async def test_one_payment_one_row_per_table_one_connected_trace(running: Pipeline) -> None:
    cid = running.pay("student-7", "course-3", "99.50")

    async def session_written() -> int:
        return await count(running.db_url, "tutoring_sessions", cid)

    await wait_for(session_written, timeout=30, what="tutoring session row")
    for table in TABLES:
        assert await count(running.db_url, table, cid) == 1, table
    marks = await fetchval(
        running.db_url, "SELECT count(*) FROM processed_events WHERE correlation_id = $1", cid
    )
    assert marks == 3
    source = await fetchval(
        running.db_url,
        "SELECT metadata->>'source' FROM student_course_purchases WHERE correlation_id = $1",
        cid,
    )
    assert source == "payment"

    async def all_step_spans() -> bool:
        names = {s.name for s in running.otlp.for_correlation(cid)}
        return set(STEPS) <= names and SERVICES <= {
            s.service for s in running.otlp.for_correlation(cid)
        }

    await wait_for(all_step_spans, timeout=20, what="spans of every service")
    spans = running.otlp.for_correlation(cid)
    assert len({s.trace_id for s in spans}) == 1, "one connected trace"
    by_id = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_id or s.parent_id not in by_id]
    assert len(roots) == 1, [(s.name, s.service) for s in roots]
    assert roots[0].service == "payment-service"
    for step in STEPS:
        step_spans = [s for s in spans if s.name == step]
        assert step_spans, step
        for s in step_spans:
            assert s.attributes["hoptrace.correlation_id"] == cid
            assert s.attributes["hoptrace.step.outcome"] == "ok"
    admin = [s for s in spans if s.service == "admin-service" and s.parent_id]
    assert admin, "admin-service server span joined the trace"


async def test_bad_http_input_is_rejected_with_the_field(running: Pipeline) -> None:
    import httpx

    port = running.env["HOPTRACE_PAYMENT_SERVICE_PORT"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        resp = await client.post("/payments", json={"student": "student-1", "course": "course-1"})
        assert resp.status_code == 422 and resp.json()["field"] == "amount"
        resp = await client.post(
            "/payments", json={"student": "student-1", "course": "course-1", "amount": "ten"}
        )
        assert resp.status_code == 422 and resp.json()["field"] == "amount"
        resp = await client.post(
            "/payments", json={"student": "student-1", "course": "course-1", "amount": "-5"}
        )
        assert resp.status_code == 422 and resp.json()["field"] == "amount"
        resp = await client.post("/payments", content=b"{not json")
        assert resp.status_code == 422
        resp = await client.post(
            "/payments", json={"student": "nobody", "course": "course-1", "amount": "10"}
        )
        assert resp.status_code == 404 and resp.json()["field"] == "student"
        resp = await client.post(
            "/payments", json={"student": "student-1", "course": "course-999", "amount": "10"}
        )
        assert resp.status_code == 404 and resp.json()["field"] == "course"
        assert (await client.get("/healthz")).status_code == 200
    assert (
        await fetchval(running.db_url, "SELECT count(*) FROM payments WHERE student = 'nobody'")
        == 0
    )


def test_pay_command_refuses_an_unknown_student_clearly(running: Pipeline) -> None:
    import subprocess

    from .harness import HOPTRACE

    res = subprocess.run(
        [HOPTRACE, "pay", "--student", "student-4040"],
        env=running.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "unknown student 'student-4040'" in res.stderr


async def test_poison_record_goes_to_the_dlq_and_the_worker_keeps_going(running: Pipeline) -> None:
    from .harness import produce, read_topic

    topic = running.topic("purchase.created")
    marker = b'{"this is": "not an envelope", "id": "' + cid_bytes() + b'"}'
    await produce(running.bootstrap, topic, marker)

    async def parked() -> bool:
        return any(r.value == marker for r in await read_topic(running.bootstrap, topic + ".dlq"))

    await wait_for(parked, timeout=20, what="poison record on the DLQ")
    cid = running.pay()

    async def done() -> int:
        return await count(running.db_url, "tutoring_sessions", cid)

    await wait_for(done, timeout=30, what="the next payment to complete")
    assert running.services.procs["allocation-worker"].poll() is None


async def test_deeply_nested_record_is_poison_not_a_crash_loop(running: Pipeline) -> None:
    """Regression: ``[`` x 5,000 (10 KB) on purchase-confirmed made ``json.loads`` raise
    RecursionError, which the envelope parser did not catch: the lane failed, purchase-worker
    exited and, restarted, read the same record again (the partition blocked, nothing on the
    dead-letter topic). Now it is a poison record and the worker goes on."""
    from .harness import header, produce, read_topic

    topic = running.topic("purchase.created")
    cid = f"nested-{cid_bytes().decode()[:12]}"
    value = b"[" * 5000
    await produce(running.bootstrap, topic, value, headers=[("x-correlation-id", cid.encode())])

    async def parked() -> list:
        recs = await read_topic(running.bootstrap, topic + ".dlq")
        return [r for r in recs if header(r, "x-correlation-id") == cid]

    recs = await wait_for(parked, timeout=30, what="the nested record on the DLQ")
    assert recs[0].value == value
    assert "nested too deeply" in (header(recs[0], "x-dlq-reason") or "")
    assert header(recs[0], "x-dlq-step") == "purchase.created"
    assert running.services.procs["purchase-worker"].poll() is None  # still running
    good = running.pay()

    async def done() -> int:
        return await count(running.db_url, "tutoring_sessions", good)

    await wait_for(done, timeout=30, what="the next payment to complete")
    assert running.services.procs["purchase-worker"].poll() is None


def cid_bytes() -> bytes:
    import uuid

    return uuid.uuid4().hex.encode()


async def test_demo_traffic_drives_payments_through(running: Pipeline) -> None:
    import asyncio
    import subprocess

    from .harness import HOPTRACE

    res = await asyncio.to_thread(
        subprocess.run,
        [HOPTRACE, "demo", "traffic", "--rate", "25", "--count", "10"],
        env=running.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    ids = res.stdout.split()
    assert len(ids) == 10 and "10 payments accepted, 0 failed" in res.stderr

    async def all_done() -> bool:
        return all([await count(running.db_url, "tutoring_sessions", i) == 1 for i in ids])

    await wait_for(all_done, timeout=30, what="10 payments through the pipeline")


async def test_admin_service_rejects_a_malformed_allocation(running: Pipeline) -> None:
    import httpx

    port = running.env["HOPTRACE_ADMIN_SERVICE_PORT"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        bad_id = {"correlation_id": "'; drop table x", "student": "s", "course": "c"}
        resp = await client.post("/allocations", json=bad_id)
        assert resp.status_code == 422 and resp.json()["field"] == "correlation_id"
        resp = await client.post("/allocations", json={"correlation_id": "abc", "student": "s"})
        assert resp.status_code == 422 and resp.json()["field"] == "course"
        ok = {"correlation_id": "admin-direct-1", "student": "s", "course": "c"}
        first = (await client.post("/allocations", json=ok)).json()
        again = (await client.post("/allocations", json=ok)).json()
    assert first["created"] is True and again["created"] is False
    assert first["trainer"] == again["trainer"]
    assert await count(running.db_url, "trainer_allocations", "admin-direct-1") == 1

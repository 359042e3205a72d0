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
